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
        assert seq % (2 * world_size) == 0, f"case seq={seq} cannot be zigzag-sharded over {world_size} ranks"
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


# --- the tiling of each ring step, and the kernels (no process group needed) ---

from longctx.attention import blocks  # noqa: E402
from longctx.parallel import ring as ring_module  # noqa: E402
from longctx.parallel.zigzag import zigzag_global_indices  # noqa: E402


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_tiles_cover_each_query_key_pair_once(world_size, causal):
    seq_local = 6
    covered = torch.zeros(seq_local * world_size, seq_local * world_size, dtype=torch.int64)
    for rank in range(world_size):
        q_index = zigzag_global_indices(seq_local, rank, world_size)
        for step in range(world_size):
            k_index = zigzag_global_indices(seq_local, (rank - step) % world_size, world_size)
            tiles = ring_module._tiles_for_step(step, rank, world_size, seq_local, causal)
            assert sum((t.q.stop - t.q.start) * (t.k.stop - t.k.start) / (1 + t.causal) for t in tiles) == \
                (seq_local ** 2 / (1 + causal) if step == 0 or not causal else seq_local ** 2 / 2)  # balanced work
            for tile in tiles:
                assert tile.q.stop - tile.q.start <= seq_local // 2 and tile.k.stop - tile.k.start <= seq_local // 2
                pairs = torch.ones(tile.q.stop - tile.q.start, tile.k.stop - tile.k.start, dtype=torch.int64)
                if tile.causal:
                    pairs = pairs.tril()
                covered[q_index[tile.q][:, None], k_index[tile.k][None, :]] += pairs
    n = seq_local * world_size
    expected = torch.ones(n, n, dtype=torch.int64)
    assert torch.equal(covered, expected.tril() if causal else expected)


def test_kernel_preference():
    assert blocks.preferred_kernel("cpu", torch.float32, 64) == "cpu-flash"
    assert blocks.preferred_kernel("cuda", torch.bfloat16, 128) == "cuda-flash"
    assert blocks.preferred_kernel("cuda", torch.float16, 64) == "cuda-flash"
    assert blocks.preferred_kernel("cuda", torch.float32, 64) == "cuda-efficient"
    assert blocks.preferred_kernel("cuda", torch.bfloat16, 512) == "cuda-efficient"
    assert blocks.preferred_kernel("cuda", torch.bfloat16, 12) == "math"
    assert blocks.preferred_kernel("mps", torch.float32, 64) == "math"
    q = torch.zeros(1, 2, 4, 8)
    assert blocks.choose_kernel(q) == "cpu-flash"
    assert blocks.choose_kernel(q, math_only=True) == "math"


def test_kernel_check_against_math(monkeypatch):
    assert blocks.kernel_matches_math("cpu-flash", torch.device("cpu"), torch.float32, 16)
    # a kernel this build cannot run here (a CUDA op on CPU tensors) is refused with a warning
    with pytest.warns(UserWarning, match="cuda-flash .* using the math kernel"):
        assert not blocks.kernel_matches_math("cuda-flash", torch.device("cpu"), torch.bfloat16, 16)
    # a kernel that runs but disagrees (e.g. a misread lse layout) is refused too
    honest = blocks._cpu_flash_forward
    monkeypatch.setattr(blocks, "_cpu_flash_forward", lambda *a: (lambda o, lse: (o, lse + 0.1))(*honest(*a)))
    with pytest.warns(UserWarning, match="differs from the math kernel"):
        assert not blocks.kernel_matches_math("cpu-flash", torch.device("cpu"), torch.float32, 16)
    # a bug in our own call (a TypeError) is not mistaken for a missing kernel
    monkeypatch.setattr(blocks, "_cpu_flash_forward", lambda *a: honest(*a[:-1]))
    with pytest.raises(TypeError):
        blocks.kernel_matches_math("cpu-flash", torch.device("cpu"), torch.float32, 16)


def test_choose_kernel_falls_back_to_math_and_remembers(monkeypatch):
    monkeypatch.setattr(blocks, "_checked_kernels", {})
    monkeypatch.setattr(blocks, "preferred_kernel", lambda device_type, dtype, head_dim: "cuda-efficient")
    q = torch.zeros(1, 2, 4, 8)
    with pytest.warns(UserWarning, match="cuda-efficient"):
        assert blocks.choose_kernel(q) == "math"
    assert blocks._checked_kernels == {("cuda-efficient", "cpu", torch.float32, 8): "math"}
    assert blocks.choose_kernel(q) == "math"  # checked once


@pytest.mark.parametrize("kernel, dtype", [("cuda-flash", torch.bfloat16), ("cuda-efficient", torch.float32)])
def test_cuda_kernels_through_the_ring_on_meta_tensors(monkeypatch, kernel, dtype):
    """The CUDA kernels' call signatures and returned layouts (lse padding of the efficient kernel included),
    through the whole ring forward and backward, on PyTorch's meta device (shapes only: no GPU here)."""
    monkeypatch.setattr(ring_module, "choose_kernel", lambda q, math_only=False: kernel)
    calls = []
    for name in ("_cuda_flash_forward", "_cuda_flash_backward", "_cuda_efficient_forward", "_cuda_efficient_backward"):
        original = getattr(blocks, name)
        monkeypatch.setattr(blocks, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    q = torch.empty(2, 50, 6, 64, device="meta", dtype=dtype, requires_grad=True)
    k, v = (torch.empty(2, 50, 2, 64, device="meta", dtype=dtype, requires_grad=True) for _ in range(2))
    out = ring_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    out.backward(torch.empty_like(out))
    for tensor in (q, k, v):
        assert tensor.grad.shape == tensor.shape and tensor.grad.dtype == dtype
    prefix = "_" + kernel.replace("-", "_")
    assert set(calls) == {prefix + "_forward", prefix + "_backward"}
    # the efficient kernel's lse is padded to 32 rows; ours is cut to the query rows (25 per tile here)
    out, lse = blocks.block_forward(kernel, *(torch.empty(2, 1, 25, 64, device="meta", dtype=dtype) for _ in range(3)),
                                    0.125, True, None)
    assert out.shape == (2, 1, 25, 64) and lse.shape == (2, 1, 25) and lse.dtype == torch.float32
