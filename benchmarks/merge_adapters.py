"""Benchmark: `longctx merge-adapters` against the old merge_adapters script's approach.

The old approach (the script users run today): AutoModelForCausalLM in float16, then for each
adapter PeftModel.from_pretrained + merge_and_unload, then save_pretrained. Ours: the
`longctx merge-adapters` command. Each run is its own subprocess; we report wall time and peak
RSS (the child's ru_maxrss from wait4) and the ratios old / ours.

Cases:
  (a) the default model (SmolLM2-135M, float32) with 3 adapters (ranks 8/16/32 on all seven
      projections; the last also saves lm_head in full);
  (b) a Llama-3.2-1B-shaped random model (hidden 2048, 16 layers, 32 heads / 8 kv heads,
      intermediate 8192, vocab 128256, tied embeddings, bfloat16), generated on disk tensor by
      tensor under the work directory, with 3 adapters (ranks 16/32/64 on all seven projections).

    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/merge_adapters.py [--cases a,b] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from common import LLAMA_32_1B, run_measured, write_random_llama

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_1B = {**LLAMA_32_1B, "bos_token_id": 1, "eos_token_id": 2}  # with SmolLM2's tokenizer

OLD_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, out, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
for path in adapters:
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
AutoTokenizer.from_pretrained(base).save_pretrained(out)
model.save_pretrained(out)
"""


def make_adapters(base_dir: Path, directory: Path, ranks: list[int], *, save_lm_head_in_last: bool) -> list[Path]:
    """Random PEFT LoRA adapters (float32 factors) written from the base's tensor shapes."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from longctx.models import TensorReader

    paths = []
    with TensorReader(base_dir) as reader:
        for index, rank in enumerate(ranks):
            path = directory / f"adapter-r{rank}"
            paths.append(path)
            if (path / "adapter_model.safetensors").is_file():
                continue
            generator = torch.Generator().manual_seed(100 + index)
            tensors = {}
            for name in reader.names():
                module = name.removesuffix(".weight")
                if module.rsplit(".", 1)[-1] in PROJECTIONS:
                    out_features, in_features = reader.shape(name)
                    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
                    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
            save_lm_head = save_lm_head_in_last and index == len(ranks) - 1
            if save_lm_head:
                embedding = reader.get("model.embed_tokens.weight")
                tensors["base_model.model.lm_head.weight"] = embedding + torch.randn(embedding.shape, generator=generator).to(embedding.dtype) * 0.001
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS,
                       modules_to_save=["lm_head"] if save_lm_head else None).save_pretrained(path)
            save_file(tensors, path / "adapter_model.safetensors")
    return paths


def warm_cache(*directories: Path) -> None:
    """Read every file once so both approaches start from the page cache."""
    for directory in directories:
        for path in Path(directory).rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(64 * 1024**2):
                        pass


def bench_case(label: str, base_dir: Path, adapters: list[Path], work: Path, repeats: int) -> dict:
    python = sys.executable
    longctx = str(Path(python).with_name("longctx"))
    results = {"old": [], "ours": []}
    for repeat in range(repeats):
        for approach in ("old", "ours"):
            out = work / f"out-{approach}"
            shutil.rmtree(out, ignore_errors=True)
            warm_cache(base_dir, *adapters)
            if approach == "old":
                command = [python, "-c", OLD_SCRIPT, str(base_dir), str(out), *map(str, adapters)]
            else:
                command = [longctx, "merge-adapters", "--base_model_name_or_path", str(base_dir),
                           "--peft_model_paths", *map(str, adapters), "--output_dir", str(out)]
            seconds, rss_bytes = run_measured(command)
            rss = rss_bytes / 1024**3
            results[approach].append((seconds, rss))
            print(f"  {label} {approach:4s} run {repeat + 1}: {seconds:6.1f} s  peak RSS {rss:5.2f} GiB", flush=True)
    old_time = min(t for t, _ in results["old"])
    ours_time = min(t for t, _ in results["ours"])
    old_rss = min(r for _, r in results["old"])
    ours_rss = min(r for _, r in results["ours"])
    check = compare_outputs(work / "out-old", work / "out-ours")
    return dict(case=label, old_s=old_time, ours_s=ours_time, old_rss=old_rss, ours_rss=ours_rss, **check)


def compare_outputs(old_dir: Path, ours_dir: Path) -> dict:
    """Largest relative difference between the two merged models, one tensor at a time."""
    from longctx.models import TensorReader

    worst = 0.0
    with TensorReader(old_dir) as old, TensorReader(ours_dir) as ours:
        for name in ours.names():
            if name not in old:
                continue
            a, b = old.get(name).float(), ours.get(name).float()
            worst = max(worst, ((a - b).norm() / b.norm().clamp(min=1e-30)).item())
    return {"max_rel_diff_old_vs_ours": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="a,b", help="which cases to run: a, b or a,b (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per approach; the best is reported (default: %(default)s)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "longctx-bench-merge"), help="work directory (default: %(default)s)")
    args = parser.parse_args()

    from longctx.models import resolve_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    default_dir = resolve_model("smollm2-135m")
    rows = []
    if "a" in args.cases:
        adapters = make_adapters(default_dir, work / "a", [8, 16, 32], save_lm_head_in_last=True)
        rows.append(bench_case("(a) SmolLM2-135M f32, 3 adapters", default_dir, adapters, work / "a", args.repeats))
    if "b" in args.cases:
        base = write_random_llama(work / "b" / "llama-1b-bf16", LLAMA_1B, tokenizer_source=default_dir, max_shard_bytes=5 * 10**9)
        adapters = make_adapters(base, work / "b", [16, 32, 64], save_lm_head_in_last=False)
        rows.append(bench_case("(b) Llama-3.2-1B-shaped bf16, 3 adapters", base, adapters, work / "b", args.repeats))

    print()
    print("| case | old: time | ours: time | time ratio old/ours | old: peak RSS | ours: peak RSS | RSS ratio old/ours | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['old_s']:.1f} s | {row['ours_s']:.1f} s | {row['old_s'] / row['ours_s']:.2f}x "
              f"| {row['old_rss']:.2f} GiB | {row['ours_rss']:.2f} GiB | {row['old_rss'] / row['ours_rss']:.2f}x "
              f"| {row['max_rel_diff_old_vs_ours']:.1e} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
