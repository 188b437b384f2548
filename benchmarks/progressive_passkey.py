"""Evidence that `longctx train` extends context, on CPU in minutes.

1. init      a tiny Llama (random weights, 2 layers, hidden 128) with a word-level tokenizer over
             the passkey prompts' words, native length 256
2. pretrain  `longctx train` from scratch at 256 tokens on synthetic passkey documents (the needle
             test's own prompts + answer + EOS, of varied lengths, loss on the answer only): it
             learns to retrieve the pass key
3. extend    `longctx train --config configs/tiny-passkey.yaml`: 512 then 1024 tokens, rope
             planned by the configured method (yarn) at each stage
4. evaluate  `longctx needle --task passkey` (greedy generation, first-integer match; 5 depths x
             4 samples per length) at 256, 512 and 1024 tokens on three models: the pretrained
             one (native rope), the pretrained one with the last stage's rope and no training
             (`longctx extend --method yarn --target-len 1024`), and the trained one
5. sp        the first extension stage for a few steps with 1 rank and with 2 gloo ranks of
             sequence parallelism (torchrun): the loss curves must agree

Every phase skips work already done (outputs in --work), and training phases resume from
their checkpoints, so the script can be run in pieces:

    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/progressive_passkey.py --phase init --phase pretrain
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

# The tiny model: 2 layers are enough for an induction-style copy of the pass key (a previous-token
# head, then a head that finds the token after "is" in the needle and copies on from there).
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, rope_theta=10000.0)
# Loss on the answer only (the key's digits and EOS): with the loss on every token the filler,
# which is predictable, drowns the copy (last session: loss 0.066, 0% retrieval after 2,500 steps).
PRETRAIN_STAGE = dict(seq_len=NATIVE, steps=1000, learning_rate=2.0e-3, warmup_steps=50, lr_schedule="cosine",
                      batch_size=16)


def build_word_tokenizer(tasks: tuple[str, ...] = ("passkey",)):
    """A word-level tokenizer over the words of the prompts of `tasks` (`longctx needle --task`
    names); digits are single tokens and spaces are kept as '▁' prefixes, so decoding gives back
    the exact text (' 71432')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from longctx.tasks.haystacks import NOISE_SENTENCES
    from longctx.tasks.retrieval import ADJECTIVES, NOUNS, Task

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    import random

    texts = [NOISE_SENTENCES + "\n\n", " 0123456789"]
    for task in map(Task, tasks):
        sample = task.sample(random.Random(0))
        texts += [f"{task.instruction}\n", " " + sample.needles[0], f"\n{sample.question} {sample.answer_prefix}{sample.answer}"]
    if set(tasks) - {"passkey", "reverse", "needle"}:  # RULER's keys are adjective-noun pairs of 3,600: a sample holds one
        texts.append(" " + " ".join(f"{adjective}-{noun}" for adjective in ADJECTIVES for noun in NOUNS))
    pieces = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)} | set("0123456789"))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=NATIVE)


def init_model(dest: Path, seed: int, tasks: tuple[str, ...] = ("passkey",)) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from longctx.train.data import passkey_documents

    tokenizer = build_word_tokenizer(tasks)
    documents = passkey_documents(tokenizer, NATIVE, seed=0, tasks=tasks)
    for document in (next(documents) for _ in range(20)):
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
    return run_timed(command)


def pretrain_config(work: Path, seed: int, steps: int) -> Path:
    config = {
        "model": str(work / "init"), "output": str(work / "pretrained-256"), "seed": seed,
        "data": {"source": "synthetic-passkey", "passkey": {"loss": "answer"}},
        "optimizer": {"weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0},
        "logging": {"log_every": 50, "checkpoint_every": 250},
        "stages": [dict(PRETRAIN_STAGE, steps=steps)],
    }
    path = work / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def longctx_cli(*arguments: str) -> float:
    """Run a longctx command (extend, needle) and return its seconds."""
    return run_timed([sys.executable, "-m", "longctx", *arguments])


def run_timed(command: list) -> float:
    """Run a command (printed first), failing on a non-zero exit; returns its seconds."""
    print("$", " ".join(str(c) for c in command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - started


def needle_accuracy(model_dir: Path, output: Path, lengths: list[int], samples: int) -> dict[str, float]:
    """Passkey accuracy per length from `longctx needle` (its summary.json)."""
    longctx_cli("needle", "--model", str(model_dir), "--task", "passkey", "--lengths", ",".join(map(str, lengths)),
                "--depths", "0,25,50,75,100", "--samples", str(samples), "--seed", "1", "--output", str(output),
                "--overwrite")
    return json.loads((output / "summary.json").read_text())["per_length"]


def sp_check(work: Path, config_path: Path, steps: int) -> dict:
    """The first extension stage for `steps` steps, 1 rank vs 2 gloo ranks with sequence_parallel 2."""
    config = yaml.safe_load(config_path.read_text())
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
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STAGE["steps"], help="steps of the pretraining at 256")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the extension's training config")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per training / evaluation process (1: steadiest on a shared machine)")
    args = parser.parse_args()
    phases = args.phase or list(PHASES)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the longctx commands it runs
    from longctx.models.metadata import read_metadata

    if "init" in phases and not (work / "init" / "config.json").is_file():
        init_model(work / "init", args.seed)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("seconds", {})
    if "pretrain" in phases and not (work / "pretrained-256").is_dir():
        results["seconds"]["pretrain"] = round(longctx_train(pretrain_config(work, args.seed, args.pretrain_steps),
                                                           work / "pretrained-256"), 1)
        results_path.write_text(json.dumps(results, indent=2, default=str))
    if "extend" in phases and not (work / "extended-1k").is_dir():
        results["seconds"]["extend"] = round(longctx_train(args.config, work / "extended-1k", model=work / "pretrained-256"), 1)
        results_path.write_text(json.dumps(results, indent=2, default=str))
    if "evaluate" in phases:
        lengths = [NATIVE, 2 * NATIVE, 4 * NATIVE]
        rope_only = work / "rope-only-1k"
        if not rope_only.is_dir():
            longctx_cli("extend", "--model", str(work / "pretrained-256"), "--method", "yarn",
                        "--target-len", str(4 * NATIVE), "--output", str(rope_only))
        started = time.perf_counter()
        results["rows"] = {
            "pretrained at 256, native rope": needle_accuracy(work / "pretrained-256", work / "needle-pretrained",
                                                              lengths, args.samples),
            "pretrained + `longctx extend --method yarn` (rope only)": needle_accuracy(
                rope_only, work / "needle-rope-only", lengths, args.samples),
            "after `longctx train` (512, then 1024)": needle_accuracy(work / "extended-1k", work / "needle-extended",
                                                                      lengths, args.samples),
        }
        results["seconds"]["evaluate"] = round(time.perf_counter() - started, 1)
        trained = read_metadata(work / "extended-1k")
        results["rope"] = {"rope_parameters": trained["rope_parameters"],
                           "max_position_embeddings": trained["max_position_embeddings"]}
        results["rope_only"] = {key: read_metadata(rope_only)[key] for key in ("rope_parameters", "max_position_embeddings")}
        results["probes_per_length"] = 5 * args.samples
    for name in ("pretrained-256", "extended-1k"):
        if (work / name / "longctx.json").is_file():
            results.setdefault("stages", {})[name] = [
                {key: stage.get(key) for key in ("seq_len", "steps", "tokens", "final_loss", "mean_loss_last_10")}
                for stage in read_metadata(work / name)["stages"]]
    if "sp" in phases:
        results["sp"] = sp_check(work, args.config, args.sp_steps)
    results_path.write_text(json.dumps(results, indent=2, default=str))

    print(f"\nseconds: {results['seconds']}")
    for name, stages in results.get("stages", {}).items():
        for stage in stages:
            print(f"{name}: stage at {stage['seq_len']}: {stage['steps']} steps, {stage['tokens']:,} tokens, "
                  f"final loss {stage['final_loss']:.4f} (mean of its last 10 steps: {stage['mean_loss_last_10']:.4f})")
    if "rows" in results:
        lengths = sorted({int(length) for row in results["rows"].values() for length in row})
        print(f"\npasskey accuracy, `longctx needle --task passkey` ({results['probes_per_length']} probes per length: "
              f"5 depths x {args.samples})")
        print(f"| model | {' | '.join(str(length) for length in lengths)} |")
        print("|---|" + "---|" * len(lengths))
        for name, row in results["rows"].items():
            print(f"| {name} | " + " | ".join(f"{float(row[str(length)]):.0%}" for length in lengths) + " |")
        print(f"rope after training: {results['rope']}")
        print(f"rope only (longctx extend): {results['rope_only']}")
    if "sp" in results:
        sp = results["sp"]
        print(f"\nsequence parallel, {sp['steps']} steps of stage 1: max |loss(1 rank) - loss(2 ranks)| = {sp['max_abs_diff']:.2e}")
        print("| step | 1 rank | 2 ranks (ring) |\n|---|---|---|")
        for i, (a, b) in enumerate(zip(sp["one_rank"], sp["two_ranks"]), start=1):
            print(f"| {i} | {a:.6f} | {b:.6f} |")
    if "rows" in results:
        before, _, after = results["rows"].values()
        length = str(4 * NATIVE)
        print(json.dumps({"length": 4 * NATIVE, "before": float(before[length]), "after": float(after[length])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
