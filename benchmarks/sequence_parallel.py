"""The three sequence-parallel modes side by side on CPU/gloo: bytes sent and CPU seconds per rank of
one attention forward+backward, for the ring (U = 1), the hybrid (1 < U < P) and Ulysses (U = P).

Every mode runs through `longctx_ring`'s attention function with the groups `longctx train` sets
(new_sequence_parallel_groups), P forked processes of one thread each, on each rank's P-way zigzag
shard of one causal sequence (batch 1). Warmed up first at a tiny length.

Bytes: every collective the attention calls is counted in each rank as it is posted: the isends of
the ring's batch_isend_irecv, the part of an all_to_all_single that leaves the rank ((U-1)/U of it),
and an all_gather's tensor once per other rank. "big" is q/k/v/output and their gradients, "small"
the shape and position all-gathers; "formula": docs/parallel.md's table for the big part ("exact"
when every rank's count equals it to the byte).
CPU: time.process_time of the forward and of the backward in each rank (all of the process's
threads, gloo's included); the machine's cores are shared, so wall time is not reported.

    python benchmarks/sequence_parallel.py --lengths 16384,32768 --world-size 4 --heads 8 --kv-heads 2
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.parallel import new_sequence_parallel_groups, set_sequence_parallel_groups, zigzag_shard
from longctx.parallel.transformers_attention import longctx_ring_attention_forward

SMALL_BYTES = 4096  # shape and position all-gathers: at most a few KiB; q/k/v pieces are far larger


class _Counter:
    """Bytes this rank sends, wrapped around the torch.distributed calls the attention makes."""

    def __init__(self):
        self.big = self.small = 0
        self.originals = {}

    def add(self, nbytes: int) -> None:
        if nbytes > SMALL_BYTES:
            self.big += nbytes
        else:
            self.small += nbytes

    def install(self) -> None:
        self.originals = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_to_all_single", "all_gather")}
        counter = self

        def batch_isend_irecv(ops):
            for op in ops:
                if op.op is dist.isend:
                    counter.add(op.tensor.numel() * op.tensor.element_size())
            return counter.originals["batch_isend_irecv"](ops)

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            size = dist.get_world_size(group)
            counter.add(input.numel() * input.element_size() * (size - 1) // size)
            return counter.originals["all_to_all_single"](output, input, *args, group=group, **kwargs)

        def all_gather(tensors, tensor, group=None, **kwargs):
            counter.add(tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1))
            return counter.originals["all_gather"](tensors, tensor, group=group, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = (
            batch_isend_irecv, all_to_all_single, all_gather)

    def take(self) -> tuple[int, int]:
        taken = self.big, self.small
        self.big = self.small = 0
        return taken


def formula_bytes(length, world_size, ulysses, heads, kv_heads, head_dim, element) -> tuple[int, int]:
    """docs/parallel.md's bytes per rank (forward, backward) for q/k/v/output and their gradients."""
    n = length // world_size
    rings = world_size // ulysses
    repeated = kv_heads * (ulysses // math.gcd(kv_heads, ulysses)) if ulysses > 1 else kv_heads
    forward = backward = 0
    if ulysses > 1:
        exchange = (ulysses - 1) * n * head_dim * element * (2 * heads + 2 * repeated) // ulysses
        forward += exchange
        backward += exchange
    if rings > 1:  # the ring over R ranks of U*n tokens with repeated/U KV heads: n*repeated per step
        forward += 2 * (rings - 1) * n * repeated * head_dim * element
        backward += (rings - 1) * n * repeated * head_dim * 2 * element + rings * n * repeated * head_dim * 8
    return forward, backward


class _Attention(torch.nn.Module):
    is_causal = True


def _attend(q, k, v):
    out, _ = longctx_ring_attention_forward(_Attention(), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)
    return out


def _measure(rank, world_size, port, ulysses, lengths, heads, kv_heads, head_dim, dtype, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=30))
    set_sequence_parallel_groups(new_sequence_parallel_groups(world_size, ulysses))
    counter = _Counter()
    counter.install()
    for length in [16 * world_size] + lengths:  # the first: warm-up
        generator = torch.Generator().manual_seed(length)
        q, k, v = (zigzag_shard(torch.randn(1, length, h, head_dim, generator=generator, dtype=dtype), rank, world_size)
                   .requires_grad_() for h in (heads, kv_heads, kv_heads))
        grad_out = zigzag_shard(torch.randn(1, length, heads, head_dim, generator=generator, dtype=dtype), rank,
                                world_size)
        dist.barrier()
        counter.take()
        started = time.process_time()
        out = _attend(q, k, v)
        forward_cpu = time.process_time() - started
        forward_bytes = counter.take()
        started = time.process_time()
        out.backward(grad_out)
        backward_cpu = time.process_time() - started
        backward_bytes = counter.take()
        checksum = float(out.detach().double().sum() + q.grad.double().sum())
        del q, k, v, out, grad_out
        if length != 16 * world_size:
            results.put((length, rank, forward_cpu, backward_cpu, forward_bytes, backward_bytes, checksum))
    dist.destroy_process_group()


def run(world_size, ulysses, lengths, args) -> list[tuple]:
    context = mp.get_context("fork")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_measure, args=(rank, world_size, port, ulysses, lengths, args.heads,
                                                        args.kv_heads, args.head_dim, getattr(torch, args.dtype),
                                                        results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    rows = [results.get() for _ in range(world_size * len(lengths))]
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"P={world_size} U={ulysses}: a rank failed (exit code {process.exitcode})")
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--ulysses", default=None, help="comma-separated Ulysses degrees (default: every divisor of P)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    world_size = args.world_size
    degrees = ([int(x) for x in args.ulysses.split(",")] if args.ulysses
               else [u for u in range(1, world_size + 1) if world_size % u == 0])
    element = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    names = {1: "ring"} | {world_size: "Ulysses"}
    print(f"P = {world_size} gloo ranks, 1 thread each; batch 1, {args.heads} query heads, {args.kv_heads} KV heads, "
          f"head_dim {args.head_dim}, {args.dtype}, causal, one attention forward+backward; torch {torch.__version__}")
    print("| N | mode | U x R | MiB sent per rank fwd | bwd | formula fwd / bwd | small KiB | "
          "CPU s per rank fwd (mean, max) | bwd (mean, max) | fwd+bwd mean | sum over ranks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    table = {}
    for ulysses in degrees:
        for row in run(world_size, ulysses, lengths, args):
            table.setdefault((row[0], ulysses), []).append(row)
    checksums = {}
    for length in lengths:
        for ulysses in degrees:
            rows = sorted(table[length, ulysses], key=lambda r: r[1])
            expected = formula_bytes(length, world_size, ulysses, args.heads, args.kv_heads, args.head_dim, element)
            forward = [r[2] for r in rows]
            backward = [r[3] for r in rows]
            sent_forward = max(r[4][0] for r in rows)
            sent_backward = max(r[5][0] for r in rows)
            exact = all((r[4][0], r[5][0]) == expected for r in rows)
            small = max(r[4][1] + r[5][1] for r in rows)
            total = [f + b for f, b in zip(forward, backward)]
            checksums[length, ulysses] = sum(r[6] for r in rows)
            mib = 2 ** 20
            print(f"| {length} | {names.get(ulysses, 'hybrid')} | {ulysses} x {world_size // ulysses} "
                  f"| {sent_forward / mib:.1f} | {sent_backward / mib:.1f} "
                  f"| {'exact' if exact else f'{expected[0] / mib:.1f} / {expected[1] / mib:.1f}'} | {small / 1024:.1f} "
                  f"| {sum(forward) / world_size:.2f}, {max(forward):.2f} | {sum(backward) / world_size:.2f}, {max(backward):.2f} "
                  f"| {sum(total) / world_size:.2f} | {sum(total):.2f} |", flush=True)
    for length in lengths:  # the same inputs in every mode: the same output and dq, to float32 rounding
        values = [checksums[length, u] for u in degrees]
        print(f"N = {length}: sum of out + dq over ranks per mode: " + ", ".join(f"{v:.4f}" for v in values))


if __name__ == "__main__":
    main()
