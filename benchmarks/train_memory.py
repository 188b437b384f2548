"""The dry run's memory model against measured peaks: SmolLM2-135M, real training steps on CPU.

For each point (sequence length x gloo ranks) a fresh process (torchrun for 2+ ranks) sets up the
run exactly as `longctx train` does (train/loop.py's load_model, CausalLMLoss, FSDP2 sharding, the
optimizer, train_step), takes one short step so that AdamW's state exists, resets the kernel's
peak-RSS mark (/proc/self/clear_refs), then takes one step at the full length on the synthetic
passkey rows the trainer would read. The measured figure is that step's peak RSS minus the
process's RSS before the model was loaded (imports only), with glibc's mmap threshold fixed at 64
KiB so that freed tensors leave RSS as they would leave CUDA's allocated memory; the prediction is `longctx train
--dry-run`'s per-rank total for the same config on the same number of ranks.

    python benchmarks/train_memory.py                      # 2K, 4K and 8K on 1 and 2 ranks
    python benchmarks/train_memory.py --points 2k:1,2k:2   # a subset

Writes benchmarks/results/train_memory.jsonl (one row per rank and point) and prints the table
for RESULTS.md. A memory figure, not a timing: the seconds are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "train_memory.jsonl"
DEFAULT_POINTS = "2k:1,4k:1,8k:1,2k:2,4k:2,8k:2"
WARM_SEQ_LEN = 256


def config_dict(seq_len: int, ranks: int, model: str) -> dict:
    return {
        "model": model, "output": "unused", "seed": 0, "mode": "full", "precision": "float32",
        "activation_checkpointing": True, "loss_chunk_size": 4096,
        "parallel": {"sequence_parallel": ranks},
        "data": {"source": "synthetic-passkey"},
        "stages": [{"seq_len": seq_len, "steps": 1, "learning_rate": 1e-5}],
    }


def rss_kib(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker(seq_len: int, model: str) -> None:
    """One rank of one point (run by torchrun, or alone for one rank)."""
    import torch

    torch.set_num_threads(1)
    import longctx  # noqa: F401  (registers the attention implementations, as the CLI does)
    from longctx.models import resolve_model
    from longctx.train.config import parse_config
    from longctx.train.data import collate, packed_rows
    from longctx.train.distributed import setup_runtime, shard_module
    from longctx.train.loop import load_model, make_optimizer, train_step
    from longctx.train.loss import CausalLMLoss

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    config = parse_config(config_dict(seq_len, ranks, model))
    runtime = setup_runtime(ranks)
    model_dir = resolve_model(model)
    baseline = rss_kib()
    net, tokenizer = load_model(model_dir, config, runtime)
    module = CausalLMLoss(net, config.loss_chunk_size)
    if runtime.distributed:
        shard_module(module, runtime)
    optimizer, scheduler = make_optimizer(module, config, config.stages[0], 1)
    warm = collate([next(packed_rows(config.data, tokenizer, WARM_SEQ_LEN, seed=1))])
    train_step(module, optimizer, scheduler, [warm], runtime, config.optimizer.grad_clip)
    batch = collate([next(packed_rows(config.data, tokenizer, seq_len, seed=0))])
    steady = rss_kib()
    Path("/proc/self/clear_refs").write_text("5")
    started, cpu_started = time.perf_counter(), time.process_time()
    train_step(module, optimizer, scheduler, [batch], runtime, config.optimizer.grad_clip)
    peak = rss_kib("VmHWM")
    Path(os.environ["TRAIN_MEMORY_OUT"], f"rank-{runtime.rank}.json").write_text(json.dumps({
        "seq_len": seq_len, "ranks": ranks, "rank": runtime.rank, "baseline_bytes": baseline * 1024,
        "before_step_bytes": (steady - baseline) * 1024, "peak_bytes": (peak - baseline) * 1024,
        "step_seconds": round(time.perf_counter() - started, 1), "step_cpu_seconds": round(time.process_time() - cpu_started, 1),
    }))


def predicted_bytes(seq_len: int, ranks: int, model: str) -> int:
    from longctx.train.config import parse_config
    from longctx.train.dry_run import Hardware, estimate_run

    config = parse_config(config_dict(seq_len, ranks, model))
    (stage,) = estimate_run(config, world_size=ranks, hardware=Hardware()).stages
    return stage.total


def run_point(seq_len: int, ranks: int, model: str) -> list[dict]:
    # A fixed mmap threshold: glibc then returns every freed block of 64 KiB or more at once, so RSS
    # follows the live tensors (what the model predicts, like CUDA's max_memory_allocated) instead of
    # keeping freed blocks below its dynamic threshold (up to 32 MiB) in the heap.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = [str(Path(__file__).resolve()), "--worker", "--seq-len", str(seq_len), "--model", model]
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   "--master-port", str(29500 + os.getpid() % 1000), *script]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(command, env={**env, "TRAIN_MEMORY_OUT": tmp}, cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{seq_len}:{ranks} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return [json.loads(path.read_text()) for path in sorted(Path(tmp).glob("rank-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default=DEFAULT_POINTS, help="SEQ:RANKS,... (default: %(default)s)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--report", action="store_true", help="only print the table of the points already measured")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.seq_len, args.model)
        return
    from longctx.units import parse_token_count

    points = [(parse_token_count(length), int(ranks)) for length, ranks in (p.split(":") for p in args.points.split(","))]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    measured = {(row["seq_len"], row["ranks"]) for row in read_rows()}
    for seq_len, ranks in points:
        if args.report or (seq_len, ranks) in measured:
            continue
        for row in run_point(seq_len, ranks, args.model):
            with RESULTS.open("a") as out:
                out.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"{'seq':>6} {'ranks':>5} {'rank':>4} {'measured MiB':>12} {'predicted MiB':>13} {'error':>7} {'step CPU s':>10}")
    for row in read_rows():
        if (row["seq_len"], row["ranks"]) not in points:
            continue
        predicted = predicted_bytes(row["seq_len"], row["ranks"], args.model)
        print(f"{row['seq_len']:>6} {row['ranks']:>5} {row['rank']:>4} {row['peak_bytes'] / 2**20:>12.0f} "
              f"{predicted / 2**20:>13.0f} {predicted / row['peak_bytes'] - 1:>+7.1%} {row['step_cpu_seconds']:>10.1f}")


def read_rows() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
