"""The evaluation engine's model-side costs, before and after its two CPU optimizations, in one run.

1. Attention for a chunk run on top of a KV cache: transformers' `sdpa` (an explicit
   [chunk, cache + chunk] mask) against `longctx_cached` (cached keys in one unmasked block,
   the chunk's keys in one causal block, merged by log-sum-exp). Cases: a needle suffix on a
   half-length cache, a long suffix on a short cache, and a from-scratch prefill in chunks.
2. The KV cache: transformers' DynamicCache (concatenates on every update) against the
   engine's reserved cache (writes in place): one decode step at the full length, and a cropped
   copy of a prefix cache (what every reused cell starts from).

Default model, float32, one torch thread, CPU time of this process (steady on a shared machine):
    .venv/bin/python benchmarks/eval_engine.py [--length 4096] [--repeat 2]
"""

from __future__ import annotations

import argparse

import torch
from common import cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import DynamicCache

    from longctx.eval.cache import cache_keyword
    from longctx.eval.engine import cropped_copy, evaluation_mode, new_cache, prefill
    from longctx.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("smollm2-135m")
    model.eval()
    length, half = args.length, args.length // 2
    ids = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        source = new_cache()
        prefill(model, source, ids, keep=0)

    def legacy_copy(cache, keep: int):
        return DynamicCache([(layer.keys[..., :keep, :], layer.values[..., :keep, :]) for layer in cache.layers])

    cases = {
        f"suffix {half} on a {half}-token cache": lambda copy: prefill(model, copy(source, half), ids[half:], keep=1),
        f"suffix {length - length // 16} on a {length // 16}-token cache": lambda copy: prefill(
            model, copy(source, length // 16), ids[length // 16 :], chunk_size=length, keep=1),
        f"from scratch, {length} tokens in chunks of {half}": lambda copy: prefill(
            model, copy(source, 0), ids, chunk_size=half, keep=1),
    }
    print(f"default model, float32, 1 thread, length {length}; CPU seconds, best of {args.repeat}\n")
    print("| attention for a chunk on a cache | sdpa (explicit mask) | longctx_cached | ratio |")
    print("|---|---:|---:|---:|")
    for label, work in cases.items():
        with torch.no_grad():
            masked = cpu_seconds(lambda: work(cropped_copy), args.repeat)
        with evaluation_mode(model), torch.no_grad():
            split = cpu_seconds(lambda: work(cropped_copy), args.repeat)
        print(f"| {label} | {masked:.2f} | {split:.2f} | {masked / split:.2f}x |")

    def decode_steps(copy, steps: int = 6) -> None:
        cache = copy(source, length - steps)
        for token in ids[:steps]:
            model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_keyword(model): cache})

    def reserved_copy(cache, keep: int):
        return cropped_copy(cache, keep, capacity=length)

    print("\n| KV cache | DynamicCache (concatenates) | reserved (in place) | ratio |")
    print("|---|---:|---:|---:|")
    with evaluation_mode(model), torch.no_grad():
        copy_legacy = cpu_seconds(lambda: legacy_copy(source, length - 96), args.repeat + 1)
        copy_reserved = cpu_seconds(lambda: reserved_copy(source, length - 96), args.repeat + 1)
        print(f"| cropped copy of a {length - 96}-token prefix, ms | {copy_legacy * 1e3:.0f} | {copy_reserved * 1e3:.0f} "
              f"| {copy_legacy / copy_reserved:.2f}x |")
        legacy = cpu_seconds(lambda: decode_steps(legacy_copy), args.repeat) - copy_legacy
        reserved = cpu_seconds(lambda: decode_steps(reserved_copy), args.repeat) - copy_reserved
        print(f"| one decode step at {length} tokens, ms | {legacy / 6 * 1e3:.0f} | {reserved / 6 * 1e3:.0f} "
              f"| {legacy / reserved:.2f}x |")


if __name__ == "__main__":
    main()
