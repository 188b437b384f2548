"""Ring attention on CPU/gloo: per-rank peak memory and time of attention forward+backward vs one-process SDPA.

Every measurement runs in a fresh forked process (P of them for a ring of P ranks, one thread
each). Memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just
before the inputs are created) minus its resident set at that moment, i.e. everything the
attention call needs: q/k/v, the output gradient, activations saved for backward, workspace,
received k/v and gradient buffers, and the q/k/v gradients. PyTorch's CPU allocator does not
cache, and with glibc's mmap threshold pinned at 128 KiB (mallopt, below; by default glibc raises
it after frees and then keeps freed memory resident) every tensor larger than that is mmapped and
returned to the system when freed, so the resident set follows the live tensors.
Time: wall time of forward+backward between two barriers (the slowest rank), and the summed
CPU time of all ranks (the work; P ranks share this machine's cores).
Held after forward: the resident set after the forward (inputs, output and what autograd saved for
backward, i.e. what each layer of a model keeps until its backward) minus the same starting point.
Warm-up: before that starting point every process runs its attention (SDPA, or the ring over its
process group) once at a tiny length, so one-time costs (code pages of the kernels and of gloo's
send/receive paths mapped on first use, gloo's buffers) are not counted as memory of the call;
--cold skips it (then the fixed part is ~13 MiB for SDPA and ~20 MiB for a ring rank);
--first-call-cost shows what that one-time part is: the growth of the resident set over a first
and a second tiny call, split into anonymous memory (RssAnon) and file-backed pages (RssFile:
shared-library code, shared between processes).
Slope: between consecutive lengths, the growth of the per-rank peak over SDPA's, times P: the
N-proportional memory of a rank as a multiple of SDPA's share 1/P (the goal is 1.25).

    python benchmarks/ring_attention.py --lengths 4096,8192,16384 --world-sizes 1,2,4
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from longctx.parallel import ring_attention


def _pin_mmap_threshold(size: int = 128 * 1024) -> None:
    """Make glibc mmap every allocation above `size` (and so return it when freed); inherited by forked children."""
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)


def _status_kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _attention(mode, q, k, v):
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
    return ring_attention(q, k, v, backend="torch")


def _warm_up(mode, heads, kv_heads, head_dim, dtype) -> None:
    tiny = [torch.randn(1, 16, h, head_dim, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    _attention(mode, *tiny).sum().backward()


def _first_call_cost(rank, world_size, port, mode, heads, kv_heads, head_dim, dtype, results):
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    keys = ("VmRSS", "RssAnon", "RssFile")
    before = [_status_kib(key) for key in keys]
    growth = []
    for _ in range(2):
        _warm_up(mode, heads, kv_heads, head_dim, dtype)
        after = [_status_kib(key) for key in keys]
        growth.append([(a - b) * 1024 for a, b in zip(after, before)])
        before = after
    results.put((rank, growth))
    if world_size > 1:
        dist.destroy_process_group()


def show_first_call_cost(args) -> None:
    print("| attention | P | call | resident set growth MiB | anonymous (RssAnon) MiB | file-backed (RssFile) MiB |")
    print("|---|---|---|---|---|---|")
    context = mp.get_context("fork")
    for mode, world_size in [("sdpa", 1)] + [("ring", p) for p in _world_sizes(args) if p > 1]:
        results = context.Queue()
        port = _free_port()
        processes = [context.Process(target=_first_call_cost, args=(rank, world_size, port, mode, args.heads,
                                                                    args.kv_heads, args.head_dim,
                                                                    getattr(torch, args.dtype), results))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        rows = [results.get() for _ in processes]
        for process in processes:
            process.join()
        growth = max(rows)[1] if world_size == 1 else dict(rows)[0]
        for call, (rss, anon, file) in enumerate(growth, start=1):
            print(f"| {mode} | {world_size} | {call} | {rss / 2**20:.1f} | {anon / 2**20:.1f} | {file / 2**20:.1f} |")


def _world_sizes(args) -> list[int]:
    return [int(x) for x in args.world_sizes.split(",")]


def _measure(rank, world_size, port, mode, length, heads, kv_heads, head_dim, dtype, warm, results):
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    if warm:
        _warm_up(mode, heads, kv_heads, head_dim, dtype)
    local = length // world_size
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set to the current one
    resident_before = _status_kib("VmRSS")
    q = torch.randn(1, local, heads, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(1, local, kv_heads, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(1, local, kv_heads, head_dim, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, local, heads, head_dim, dtype=dtype)
    if world_size > 1:
        dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    out = _attention(mode, q, k, v)
    held = (_status_kib("VmRSS") - resident_before) * 1024
    out.backward(grad_out)
    cpu = time.process_time() - cpu
    if world_size > 1:
        dist.barrier()
    wall = time.perf_counter() - wall
    peak = (_status_kib("VmHWM") - resident_before) * 1024
    results.put((rank, peak, wall, cpu, held))
    if world_size > 1:
        dist.destroy_process_group()


def run(mode, world_size, length, args) -> dict:
    context = mp.get_context("fork")
    results = context.Queue()
    dtype = getattr(torch, args.dtype)
    port = _free_port()
    processes = [
        context.Process(target=_measure, args=(rank, world_size, port, mode, length,
                                               args.heads, args.kv_heads, args.head_dim, dtype,
                                               not args.cold, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    rows = [results.get() for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"{mode} P={world_size} N={length}: a rank failed (exit code {process.exitcode})")
    return {
        "peak": max(r[1] for r in rows),
        "wall": max(r[2] for r in rows),
        "cpu": sum(r[3] for r in rows),
        "held": max(r[4] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cold", action="store_true", help="no warm-up call before measuring (counts one-time costs)")
    parser.add_argument("--first-call-cost", action="store_true",
                        help="only show what a first tiny call adds to the resident set (anonymous vs file-backed)")
    args = parser.parse_args()
    _pin_mmap_threshold()
    lengths = [int(x) for x in args.lengths.split(",")]
    world_sizes = _world_sizes(args)

    # load the kernels once in the parent, so forked children do not pay for it inside the timing
    for mode in ("sdpa", "ring"):
        _warm_up(mode, args.heads, args.kv_heads, args.head_dim, getattr(torch, args.dtype))
    if args.first_call_cost:
        show_first_call_cost(args)
        return

    print(f"batch 1, heads {args.heads}, kv heads {args.kv_heads}, head_dim {args.head_dim}, {args.dtype}, "
          f"causal, forward+backward, 1 thread per process, {'cold' if args.cold else 'warmed-up'} processes, "
          f"torch {torch.__version__}")
    print("| N | P | per-rank peak MiB | SDPA peak MiB | per-rank / SDPA | goal 1.25/P "
          "| held after fwd MiB | SDPA held MiB | held / SDPA | wall s | SDPA wall s | CPU s (all ranks) | CPU / SDPA CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    peaks = {}  # (mode, P, N) -> peak bytes
    for length in lengths:
        single = run("sdpa", 1, length, args)
        peaks["sdpa", 1, length] = single["peak"]
        for world_size in world_sizes:
            ring = run("ring", world_size, length, args)
            peaks["ring", world_size, length] = ring["peak"]
            print(f"| {length} | {world_size} | {ring['peak'] / 2**20:.1f} | {single['peak'] / 2**20:.1f} "
                  f"| {ring['peak'] / single['peak']:.3f} | {1.25 / world_size:.3f} | {ring['held'] / 2**20:.1f} "
                  f"| {single['held'] / 2**20:.1f} | {ring['held'] / single['held']:.3f} | {ring['wall']:.2f} "
                  f"| {single['wall']:.2f} | {ring['cpu']:.2f} | {ring['cpu'] / single['cpu']:.2f} |", flush=True)
    if len(lengths) > 1:
        print("\nSlope: per-rank peak growth / SDPA peak growth, times P (goal 1.25); fixed part: the line's intercept")
        print("| N from | N to | P | ring growth MiB | SDPA growth MiB | growth ratio x P | ring fixed MiB | SDPA fixed MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for short, long in zip(lengths, lengths[1:]):
            sdpa_growth = peaks["sdpa", 1, long] - peaks["sdpa", 1, short]
            sdpa_fixed = peaks["sdpa", 1, short] - sdpa_growth * short / (long - short)
            for world_size in world_sizes:
                growth = peaks["ring", world_size, long] - peaks["ring", world_size, short]
                fixed = peaks["ring", world_size, short] - growth * short / (long - short)
                print(f"| {short} | {long} | {world_size} | {growth / 2**20:.1f} | {sdpa_growth / 2**20:.1f} "
                      f"| {growth / sdpa_growth * world_size:.3f} | {fixed / 2**20:.1f} | {sdpa_fixed / 2**20:.1f} |")


if __name__ == "__main__":
    main()
