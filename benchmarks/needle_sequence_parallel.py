"""Per-rank peak memory of one needle cell with the KV cache sharded across ranks, against one process.

One passkey cell (noise haystack, generate scoring, prefix reuse on, chunk 2048) on the default
model, at --length, evaluated by the needle engine in one process and by P gloo ranks under
torchrun (`Evaluator(..., sharding=...)`, what `longctx needle --sequence-parallel P` runs). Each
process reports its peak resident memory while it evaluates (VmHWM, the high-water mark of its
own address space, restarted after the model is loaded and has run one short pass, so that its
lazily read weights are resident, through /proc/self/clear_refs), the peak while loading and the
memory after it, its runtime (the memory of the process with torch, transformers' Llama and longctx
imported and its process group up, before the model and tokenizer load: what every process holds
whatever P is, and what a GPU's allocator figures leave out), its CPU time and wall time, the
prefix positions it held, and the answer. A rank holds its share of the KV cache and of the decoder layers' weights
(`shard_weights`, FSDP2); the embeddings, final norm and head are whole on every rank.

Memory is the figure; the time is indicative only (the machine is shared). Run outside the heavy
lock, one torch thread per process:
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/needle_sequence_parallel.py --length 16k --ranks 2
(--worker is how the script runs itself; --only 1 or --only P runs one side.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from longctx.eval.runner import Evaluator
    from longctx.models import load_model_and_tokenizer
    from longctx.tasks.retrieval import Task
    from longctx.units import parse_token_count

    sharding = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from longctx.eval.sharded import Sharding

        dist.init_process_group("gloo")
        sharding = Sharding.of()
    import transformers.models.llama.modeling_llama  # noqa: F401  (the loader imports it lazily)

    runtime_kb = memory_kb("VmRSS")
    length = parse_token_count(args.length)
    model, tokenizer = load_model_and_tokenizer(args.model)
    if sharding is not None:  # as `longctx needle --sequence-parallel` does: a rank holds its share of the layers
        from longctx.eval.sharded import shard_weights

        shard_weights(model, sharding)
    with torch.no_grad():  # the weights are read lazily: one pass makes them resident before the baseline
        model(torch.tensor([[tokenizer.eos_token_id] * 8]))
    loaded_kb, load_peak_kb = memory_kb("VmRSS"), memory_kb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark: the evaluation's own peak
    evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=length, chunk_size=args.chunk_size,
                          sharding=sharding)
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluator.evaluate(length, args.depth)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    prefix = evaluator.prefix.cache
    held = prefix.layout.held(sharding.rank) if sharding is not None else prefix.get_seq_length()
    row = {
        "ranks": sharding.size if sharding is not None else 1, "rank": sharding.rank if sharding is not None else 0,
        "length": length, "depth": args.depth, "eval_peak_rss_mb": memory_kb("VmHWM") / 1024,
        "load_peak_rss_mb": load_peak_kb / 1024, "after_load_mb": loaded_kb / 1024, "runtime_mb": runtime_kb / 1024, "prefix_positions_held": held, "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1), "answer": result.answer, "score": result.score,
    }
    with open(args.worker, "a") as stream:
        stream.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", default="16k")
    parser.add_argument("--depth", type=float, default=100.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", type=int, help="run only the 1-process side (1) or the P-rank side (P)")
    parser.add_argument("--rows", default="benchmarks/results/needle-sequence-parallel.jsonl",
                        help="where the rows go (appended)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common = [str(HERE), "--length", args.length, "--depth", str(args.depth), "--chunk-size", str(args.chunk_size),
              "--model", args.model, "--worker", args.rows]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sides = [1, args.ranks] if args.only is None else [args.only]
    for ranks in sides:
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc-per-node", str(ranks)]
        started = time.perf_counter()
        subprocess.run([*launcher, *common], env=env, check=True)
        print(f"{ranks} process(es): {time.perf_counter() - started:.0f} s wall", flush=True)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    print("| processes | rank | evaluation peak RSS MB | runtime MB | peak beyond the runtime MB | loading peak MB | "
          "after load MB | prefix positions held | CPU s | wall s | answer | score |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        runtime = row.get("runtime_mb")  # rows written before the runtime was recorded have none
        beyond = "" if runtime is None else f"{row['eval_peak_rss_mb'] - runtime:.0f}"
        print(f"| {row['ranks']} | {row['rank']} | {row['eval_peak_rss_mb']:.0f} | "
              f"{'' if runtime is None else f'{runtime:.0f}'} | {beyond} | {row['load_peak_rss_mb']:.0f} | "
              f"{row['after_load_mb']:.0f} | "
              f"{row['prefix_positions_held']} | {row['cpu_s']} | {row['wall_s']} | {row['answer']!r} | {row['score']} |")


if __name__ == "__main__":
    main()
