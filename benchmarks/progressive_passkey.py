"""Evidence that `longctx train` extends context, on CPU in minutes.

1. init      a tiny Llama (random weights) with a word-level tokenizer over the passkey
             prompts' words, native length 256
2. pretrain  `longctx train` from scratch at 256 tokens on synthetic passkey documents
             (the needle test's own prompts + answers): it learns to retrieve the pass key
3. extend    `longctx train --config configs/tiny-passkey.yaml`: 512 then 1024 tokens, rope
             planned by the configured method at each stage
4. evaluate  passkey accuracy (longctx.eval.passkey_accuracy: the `longctx needle --task passkey`
             prompts, greedy generation, first-integer match) at 256, 512 and 1024 tokens for
             the pretrained model, the pretrained model with the last stage's rope and no
             training, and the trained model
5. sp        the first extension stage for a few steps with 1 rank and with 2 gloo ranks of
             sequence parallelism (torchrun): the loss curves must agree

Every phase skips work already done (outputs in --work), and training phases resume from
their checkpoints, so the script can be run in pieces:

    flock /tmp/longctx-heavy.lock timeout 690 .venv/bin/python benchmarks/progressive_passkey.py --phase pretrain
    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/progressive_passkey.py      # the rest

The output ends with one JSON line {"length": 1024, "before": accuracy, "after": accuracy}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-passkey.yaml"
NATIVE = 256
PHASES = ("init", "pretrain", "extend", "evaluate", "sp")

# The tiny model: 3 layers are enough for an induction-style copy of the pass key.
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, rope_theta=10000.0)
PRETRAIN_STAGE = dict(seq_len=NATIVE, steps=2500, learning_rate=1.0e-3, warmup_steps=100, lr_schedule="constant",
                      batch_size=16)


def build_word_tokenizer():
    """A word-level tokenizer over the words of the passkey prompts; digits are single tokens and
    spaces are kept as '▁' prefixes, so decoding gives back the exact text (' 71432')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from longctx.eval.haystacks import NOISE_SENTENCES
    from longctx.eval.tasks import Task

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    import random

    task = Task("passkey")
    sample = task.sample(random.Random(0))
    texts = [f"{task.instruction}\n", NOISE_SENTENCES + "\n\n", " " + sample.needles[0],
             f"\n{sample.question} {sample.answer_prefix}{sample.answer}", " 0123456789"]
    pieces = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)} | set("0123456789"))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=NATIVE)


def init_model(dest: Path, seed: int) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from longctx.train.data import passkey_documents

    tokenizer = build_word_tokenizer()
    document = next(passkey_documents(tokenizer, NATIVE, seed=0))
    assert tokenizer.unk_token_id not in document.ids, "the tokenizer misses a word of the prompts"
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=NATIVE, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": MODEL["rope_theta"]},
        **{k: v for k, v in MODEL.items() if k != "rope_theta"},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    print(f"init: tiny Llama ({sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}) in {dest}")


def longctx_train(config: Path, output: Path, model: Path | None = None, torchrun: int = 0) -> float:
    """Run the `longctx train` CLI (resuming when checkpoints exist); returns seconds."""
    checkpoints = output.with_name(output.name + "-checkpoints")
    command = [sys.executable, "-m", "longctx", "train", "--config", str(config), "--output", str(output), "--no-progress"]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
                   *command[1:]]
    if model:
        command += ["--model", str(model)]
    if (checkpoints / "latest.json").is_file():
        command.append("--resume")
    print("$", " ".join(str(c) for c in command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - started


def pretrain_config(work: Path, seed: int) -> Path:
    config = {
        "model": str(work / "init"), "output": str(work / "pretrained-256"), "seed": seed,
        "data": {"source": "synthetic-passkey", "passkey": {"loss": "all"}},
        "optimizer": {"weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0},
        "logging": {"log_every": 10, "checkpoint_every": 100},
        "stages": [PRETRAIN_STAGE],
    }
    path = work / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def accuracy(model_dir: Path, lengths: list[int], samples: int, rope: dict | None = None) -> dict[int, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.eval import passkey_accuracy
    from longctx.train.loop import set_rope

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if rope:
        set_rope(model, rope)
    depths = [0.0, 25.0, 50.0, 75.0, 100.0]
    return {length: passkey_accuracy(model, tokenizer, length=length, num_samples=samples, depths=depths, seed=1)
            for length in lengths}


def sp_check(work: Path, steps: int) -> dict:
    """The first extension stage for `steps` steps, 1 rank vs 2 gloo ranks with sequence_parallel 2."""
    config = yaml.safe_load(CONFIG.read_text())
    first = dict(config["stages"][0], steps=steps)
    curves = {}
    for ranks in (1, 2):
        directory = work / f"sp{ranks}"
        variant = {**config, "stages": [first], "parallel": {"sequence_parallel": ranks},
                   "logging": {"log_every": 1, "checkpoint_every": 1000}}
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.yaml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        output = directory / "out"
        if not output.is_dir():
            longctx_train(path, output, model=work / "pretrained-256", torchrun=ranks if ranks > 1 else 0)
        log = output / "train_log.jsonl"
        curves[ranks] = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
    diff = max(abs(a - b) for a, b in zip(curves[1], curves[2]))
    return {"steps": steps, "one_rank": curves[1], "two_ranks": curves[2], "max_abs_diff": diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "tiny-passkey", help="working directory")
    parser.add_argument("--phase", choices=PHASES, action="append", help="run only these phases (default: all)")
    parser.add_argument("--samples", type=int, default=4, help="probes per depth (5 depths) and length")
    parser.add_argument("--sp-steps", type=int, default=8, help="steps of the 1-rank vs 2-rank comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    phases = args.phase or list(PHASES)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    if "init" in phases and not (work / "init" / "config.json").is_file():
        init_model(work / "init", args.seed)
    if "pretrain" in phases and not (work / "pretrained-256").is_dir():
        seconds = longctx_train(pretrain_config(work, args.seed), work / "pretrained-256")
        print(f"pretrain: {seconds:.0f} s")
    if "extend" in phases and not (work / "extended-1k").is_dir():
        seconds = longctx_train(CONFIG, work / "extended-1k", model=work / "pretrained-256")
        print(f"extend: {seconds:.0f} s")

    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "evaluate" in phases:
        from longctx.models.metadata import read_metadata

        lengths = [NATIVE, 2 * NATIVE, 4 * NATIVE]
        trained = read_metadata(work / "extended-1k")
        last_rope = {"rope_parameters": trained["rope_parameters"], "max_position_embeddings": trained["max_position_embeddings"]}
        results["rows"] = {
            "pretrained at 256, native rope": accuracy(work / "pretrained-256", lengths, args.samples),
            "pretrained, last stage's rope, no training": accuracy(work / "pretrained-256", lengths, args.samples, last_rope),
            "after longctx train (512, 1024)": accuracy(work / "extended-1k", lengths, args.samples),
        }
        results["rope"] = last_rope
        results["stages"] = [{k: s[k] for k in ("seq_len", "steps", "tokens", "final_loss")} for s in trained["stages"]]
        results["probes_per_length"] = 5 * args.samples
    if "sp" in phases:
        results["sp"] = sp_check(work, args.sp_steps)
    results_path.write_text(json.dumps(results, indent=2, default=str))

    if "rows" in results:
        lengths = sorted({int(length) for row in results["rows"].values() for length in row})
        print(f"\npasskey accuracy ({results['probes_per_length']} probes per length: 5 depths x {args.samples})")
        print(f"| model | {' | '.join(str(length) for length in lengths)} |")
        print("|---|" + "---|" * len(lengths))
        for name, row in results["rows"].items():
            print(f"| {name} | " + " | ".join(f"{float(row[str(l)] if str(l) in row else row[l]):.0%}" for l in lengths) + " |")
        print(f"rope after training: {results['rope']}")
    if "sp" in results:
        sp = results["sp"]
        print(f"\nsequence parallel, {sp['steps']} steps of stage 1: max |loss(1 rank) - loss(2 ranks)| = {sp['max_abs_diff']:.2e}")
        print("| step | 1 rank | 2 ranks (ring) |\n|---|---|---|")
        for i, (a, b) in enumerate(zip(sp["one_rank"], sp["two_ranks"]), start=1):
            print(f"| {i} | {a:.6f} | {b:.6f} |")
    if "rows" in results:
        rows = list(results["rows"].values())

        def get(row, length):
            return float(row[str(length)] if str(length) in row else row[length])

        print(json.dumps({"length": 4 * NATIVE, "before": get(rows[0], 4 * NATIVE), "after": get(rows[2], 4 * NATIVE)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
