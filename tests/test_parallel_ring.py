"""Ring attention across spawned gloo processes equals single-process full attention (output and q/k/v gradients)."""

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from longctx.errors import LongctxError
from longctx.parallel import ring_attention, zigzag_shard, zigzag_unshard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, worker, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size, worker, *args):
    """Run worker(rank, world_size, *args) in world_size gloo processes; a failure in any rank fails the test.

    Forked, not spawned: the children inherit the imported torch/transformers, which saves seconds per rank.
    """
    mp.start_processes(_entry, args=(world_size, free_port(), worker, args), nprocs=world_size, join=True,
                       start_method="fork")


def reference_attention(q, k, v, causal=True, documents=None):
    """Single-process SDPA on [b, s, h, d]; with documents (lengths), each document attended separately."""
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    if documents is None:
        return F.scaled_dot_product_attention(*bhsd, is_causal=causal, enable_gqa=True).transpose(1, 2)
    pieces, start = [], 0
    for length in documents:
        part = [t[:, :, start:start + length] for t in bhsd]
        pieces.append(F.scaled_dot_product_attention(*part, is_causal=causal, enable_gqa=True))
        start += length
    return torch.cat(pieces, dim=2).transpose(1, 2)


def gather_unshard(local, world_size, group=None):
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return zigzag_unshard(parts)


# (seq, heads, kv_heads, head_dim, dtype, backend, causal, documents)
CASES = [
    (32, 4, 4, 16, torch.float32, "torch", True, None),
    (64, 6, 2, 16, torch.float32, "torch", True, None),
    (48, 8, 1, 32, torch.float32, "torch", True, None),
    (64, 6, 2, 16, torch.float32, "torch-math", True, None),
    (64, 4, 2, 16, torch.float32, "torch", False, None),
    (64, 4, 2, 16, torch.bfloat16, "torch", True, None),
    (64, 6, 2, 16, torch.float16, "torch", True, [40, 24]),
    (64, 6, 2, 16, torch.float32, "torch", True, [40, 24]),
    (64, 6, 3, 16, torch.float32, "torch-math", True, [9, 30, 25]),
]


def _check_cases(rank, world_size, cases, group=None, seed=0):
    for seq, heads, kv_heads, dim, dtype, backend, causal, documents in cases:
        if seq % (2 * world_size):
            continue
        generator = torch.Generator().manual_seed(seq * 100 + heads + seed)
        q, k, v = (torch.randn(2, seq, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
        grad_out = torch.randn(2, seq, heads, dim, generator=generator)
        # float32 reference from the same (rounded) inputs
        full = [t.to(dtype).float().clone().requires_grad_() for t in (q, k, v)]
        expected = reference_attention(*full, causal=causal, documents=documents)
        expected.backward(grad_out)

        local = [zigzag_shard(t.to(dtype), rank, world_size).requires_grad_() for t in (q, k, v)]
        position_ids = None
        if documents is not None:
            position_ids = zigzag_shard(torch.cat([torch.arange(n) for n in documents])[None], rank, world_size)
        out = ring_attention(*local, group=group, causal=causal, backend=backend, position_ids=position_ids)
        out.backward(zigzag_shard(grad_out.to(dtype), rank, world_size))

        tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        label = f"seq={seq} heads={heads}/{kv_heads} dtype={dtype} backend={backend} causal={causal} docs={documents}"
        assert out.dtype == dtype, label
        torch.testing.assert_close(gather_unshard(out, world_size, group).float(), expected, rtol=0, atol=tolerance,
                                   msg=label)
        for tensor, name, full_tensor in zip(local, "qkv", full):
            torch.testing.assert_close(gather_unshard(tensor.grad, world_size, group).float(), full_tensor.grad,
                                       rtol=0, atol=tolerance * 2, msg=f"d{name} {label}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_equals_full_attention(world_size):
    run_ranks(world_size, _check_cases, CASES)


def _check_errors(rank, world_size):
    torch.manual_seed(rank)
    # an odd local length cannot be two zigzag chunks: every rank gets the same clear error
    with pytest.raises(LongctxError, match="pad_for_zigzag"):
        ring_attention(*(torch.randn(1, 7, 2, 8) for _ in range(3)), position_ids=torch.arange(7)[None])
    # ranks holding shards of different lengths
    seq = 8 if rank == 0 else 12
    with pytest.raises(LongctxError, match="differ across ranks"):
        ring_attention(*(torch.randn(1, seq, 2, 8) for _ in range(3)))
    # a group of one (each rank alone) is plain attention
    singles = [dist.new_group([r]) for r in range(world_size)]
    q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    out = ring_attention(q, k, v, group=singles[rank])
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=0, atol=1e-5)
    # the ring still works afterwards (no stray messages were left in flight)
    _check_cases(rank, world_size, CASES[:1])


def test_errors_and_group_of_one():
    run_ranks(2, _check_errors)


def _check_two_rings(rank, world_size):
    # ranks {0, 1} and {2, 3}: two rings side by side (sequence parallel x data parallel), each its own sequence
    rings = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    _check_cases(rank % 2, 2, CASES[:2] + CASES[-2:], group=rings[rank // 2], seed=rank // 2)


def test_rings_on_subgroups():
    run_ranks(4, _check_two_rings)
