"""CPU time of needle cells with glibc's mmap threshold fixed at 128 KiB (eval/cache.py keep_heap_small,
what the engine does across ranks) against glibc's dynamic threshold (what one process keeps).

Each variant runs in a fresh process, alternating, one torch thread: the default model, a warm-up
cell at 2K (weights resident, prefix started), then passkey cells at --length (depths 25 and 75).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_heap_threshold.py --length 8k --repeat 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CELLS = """
import json, sys, time
import torch
torch.set_num_threads(1)
from longctx.eval import Evaluator
from longctx.eval.cache import keep_heap_small
from longctx.models.reference import load_model_and_tokenizer
from longctx.tasks.retrieval import Task
variant, length = sys.argv[1], int(sys.argv[2])
model, tokenizer = load_model_and_tokenizer(None)
if variant == "fixed":
    assert keep_heap_small()
evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=length)
evaluator.evaluate(2048, 50.0, 0)
start = time.process_time()
answers = [evaluator.evaluate(length, depth, 0).answer for depth in (25.0, 75.0)]
print(json.dumps({"variant": variant, "cpu_s": round(time.process_time() - start, 2), "answers": answers}))
"""


def main() -> None:
    from longctx.units import parse_token_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=parse_token_count, default=8192)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        for variant in ("fixed", "dynamic"):
            out = subprocess.run([sys.executable, "-c", CELLS, variant, str(args.length)], capture_output=True,
                                 text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    mean = {v: sum(r["cpu_s"] for r in runs if r["variant"] == v) / args.repeat for v in ("fixed", "dynamic")}
    print("| threshold | CPU s (mean of %d) |\n|---|---:|" % args.repeat)
    for variant, seconds in mean.items():
        print(f"| {variant} | {seconds:.1f} |")
    print(f"fixed / dynamic: {mean['fixed'] / mean['dynamic']:.3f}")


if __name__ == "__main__":
    main()
