"""What grouped-position attention (longctx_self_extend) costs against the attention it replaces, in one run.

Per attention call at the default model's shape (9 query heads, 3 key/value heads, head_dim 64),
float32, one torch thread, CPU time (best of --repeat):
- a prefill chunk of 2048 queries on top of a cache (the evaluation engine's chunk), at cache
  + chunk = each --lengths value;
- one decode step over the whole length.
The peer is the attention the engine runs for an sdpa model on the CPU (`longctx_cached`,
eval/attention.py: no mask, cached and recent keys merged by log-sum-exp), which is at least as
fast as transformers' own sdpa call here (benchmarks/eval_engine.py). Self-Extend uses G and W
from its rule for a 32K target on an 8K model (G 5, W 1024).

    .venv/bin/python benchmarks/self_extend.py [--lengths 4096,16384,32768] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform

import torch
from common import cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384,32768")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from longctx.attention.self_extend import GroupedRotation, self_extend_attention
    from longctx.eval.attention import attention_after_cache
    from longctx.rope.methods import default_inv_freq

    inv_freq = default_inv_freq(64, 1e5)
    generator = torch.Generator().manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, CPU s per call "
          f"(best of {args.repeat}); Self-Extend G {args.group_size} W {args.window}")
    print("| call | length | longctx_cached (s) | longctx_self_extend (s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for length in (int(value) for value in args.lengths.split(",")):
        key, value = (torch.randn(1, 3, length, 64, generator=generator) for _ in range(2))
        for call, queries in (("prefill chunk", args.chunk), ("decode step", 1)):
            query = torch.randn(1, 9, queries, 64, generator=generator)
            peer = cpu_seconds(lambda: attention_after_cache(query, key, value, 0.125), args.repeat)
            rotation = GroupedRotation(inv_freq, args.group_size, args.window)  # kept per layer, as the model keeps it
            ours = cpu_seconds(lambda: self_extend_attention(query, key, value, rotation=rotation, scale=0.125),
                               args.repeat)
            print(f"| {call} | {length} | {peer:.4f} | {ours:.4f} | {ours / peer:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
