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


def _measure(rank, world_size, port, mode, length, heads, kv_heads, head_dim, dtype, results):
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
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
    if mode == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True).transpose(1, 2)
    else:
        out = ring_attention(q, k, v, backend="torch")
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
                                               args.heads, args.kv_heads, args.head_dim, dtype, results))
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
    args = parser.parse_args()
    _pin_mmap_threshold()
    lengths = [int(x) for x in args.lengths.split(",")]
    world_sizes = [int(x) for x in args.world_sizes.split(",")]

    # load the kernels once in the parent, so forked children do not pay for it inside the timing
    tiny = [torch.randn(1, 8, h, args.head_dim, requires_grad=True) for h in (args.heads, args.kv_heads, args.kv_heads)]
    ring_attention(*tiny).sum().backward()

    print(f"batch 1, heads {args.heads}, kv heads {args.kv_heads}, head_dim {args.head_dim}, {args.dtype}, "
          f"causal, forward+backward, 1 thread per process, torch {torch.__version__}")
    print("| N | P | per-rank peak MiB | SDPA peak MiB | per-rank / SDPA | goal 1.25/P "
          "| held after fwd MiB | SDPA held MiB | held / SDPA | wall s | SDPA wall s | CPU s (all ranks) | CPU / SDPA CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length in lengths:
        single = run("sdpa", 1, length, args)
        for world_size in world_sizes:
            ring = run("ring", world_size, length, args)
            print(f"| {length} | {world_size} | {ring['peak'] / 2**20:.1f} | {single['peak'] / 2**20:.1f} "
                  f"| {ring['peak'] / single['peak']:.3f} | {1.25 / world_size:.3f} | {ring['held'] / 2**20:.1f} "
                  f"| {single['held'] / 2**20:.1f} | {ring['held'] / single['held']:.3f} | {ring['wall']:.2f} "
                  f"| {single['wall']:.2f} | {ring['cpu']:.2f} | {ring['cpu'] / single['cpu']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
