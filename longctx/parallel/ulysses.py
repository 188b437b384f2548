"""DeepSpeed-Ulysses sequence parallelism, alone or with the ring across its groups (the hybrid, USP).

Every rank holds its zigzag shard of the sequence (zigzag.py, over all P = U x R sequence-parallel
ranks) with all heads. An all-to-all over a Ulysses group of U consecutive ranks trades heads for
sequence: afterwards each rank holds 1/U of the heads for the union of the group's shards. Group
g (ranks gU .. gU+U-1) holds chunks gU .. gU+U-1 and 2P-gU-U .. 2P-1-gU of the 2P chunks, which are
chunks g and 2R-1-g of the sequence cut into 2R: the group's union, put in order by
zigzag_unshard, is shard g of an R-way zigzag layout. So the ring across the R groups (ring.py,
over ranks u, u+U, ...; see groups.py) runs on a zigzag layout of its own and keeps its causal
balance, while the data, the loss and the position ids keep the P-way layout for every U. (yunchang
lays out the R-way zigzag first and splits each ring shard into U contiguous pieces; the rings see
the same layout, but there the tokens a rank holds outside attention change with U.) With R = 1 it
is Ulysses alone: the group's union is the whole sequence in order, attended by this process. A
second all-to-all brings every rank its own tokens' output for all heads. Packed documents: the
position ids are all-gathered in the group and put in the same order, and the ring masks with them
as it does alone.

GQA: query head i uses KV head i // (heads / kv_heads). With kv_heads divisible by U each rank gets
kv_heads / U whole KV heads for its heads / U query heads. Otherwise each KV head is repeated
U / gcd(kv_heads, U) times, to lcm(kv_heads, U) heads (heads divisible by U and by kv_heads is
divisible by that, so the grouping stays whole): the all-to-all moves the copies and each rank gets
kv_heads / gcd(kv_heads, U) heads; autograd sums the copies' gradients. The cost is in
docs/parallel.md.

The all-to-all is its own adjoint (rank r's piece j goes to rank j as its piece r), so its backward
is the same all-to-all of the gradient, and autograd composes the two exchanges with the ring's own
backward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from longctx.errors import LongctxError
from longctx.parallel.ring import attention_over_ring, check_local_shapes, group_rank_and_size
from longctx.parallel.zigzag import zigzag_shard, zigzag_unshard


def kv_head_repeats(kv_heads: int, ulysses: int) -> int:
    """How many times each KV head is repeated so that U ranks each get whole KV heads."""
    return ulysses // math.gcd(kv_heads, ulysses)


def check_heads(heads: int, kv_heads: int, ulysses: int) -> None:
    if heads % ulysses:
        raise LongctxError(
            f"{heads} query heads cannot be split over parallel.ulysses {ulysses} ranks; choose a ulysses degree "
            f"that divides {heads} (the ring takes the rest of sequence_parallel)"
        )
    if heads % kv_heads:
        raise LongctxError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")


class _AllToAll(torch.autograd.Function):
    """x [U, ...]: x[j] goes to rank j of the group; returns y [U, ...] with y[j] from rank j."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=group)
    return received


def _sequence_to_heads(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """[b, H, s, d] (this rank's shard, all heads) -> [b, H/U, U*s, d] (the group's shards in order, heads
    of this rank), as a [b, U*s, H/U, d] tensor seen as [b, H/U, U*s, d]."""
    batch, heads, seq_local, dim = t.shape
    pieces = t.transpose(1, 2).reshape(batch, seq_local, size, heads // size, dim).permute(2, 0, 1, 3, 4)
    received = _AllToAll.apply(pieces, group)  # [U, b, s, H/U, d]: every group rank's shard of our heads
    return zigzag_unshard(list(received.unbind(0)), dim=1).transpose(1, 2)


def _heads_to_sequence(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """The inverse of _sequence_to_heads: [b, H/U, U*s, d] -> [b, H, s, d] (seen so, [b, s, H, d] in memory)."""
    batch, heads_here, _, dim = t.shape
    bshd = t.transpose(1, 2)
    pieces = torch.stack([zigzag_shard(bshd, j, size, dim=1) for j in range(size)])  # [U, b, s, H/U, d]
    received = _AllToAll.apply(pieces, group)  # [U, b, s, H/U, d]: our tokens, head group j from rank j
    seq_local = received.shape[2]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, seq_local, size * heads_here, dim).transpose(1, 2)


def _check_layout(group, ring_group, size: int) -> None:
    """The Ulysses group must be U consecutive ranks and the ring every U-th rank (groups.py), so that
    ring rank g holds the union of Ulysses group g's shards."""
    mine = dist.get_process_group_ranks(group)
    ring = dist.get_process_group_ranks(ring_group) if ring_group is not None else [mine[dist.get_rank(group)]]
    consecutive = mine == list(range(mine[0], mine[0] + size))
    strided = ring == list(range(ring[0], ring[0] + size * len(ring), size))
    if not (consecutive and strided):
        raise LongctxError(
            f"Ulysses group {mine} and ring {ring} do not form the sequence-parallel layout (groups of consecutive "
            "ranks, rings through every U-th rank); build them with longctx.parallel.new_sequence_parallel_groups"
        )


def _gather_positions(position_ids, q, k, v, group, size: int):
    """The group's position ids in the order _sequence_to_heads gives the sequence ([rows, U*s]), or None;
    the same all_gather checks that every rank of the group holds a shard of one batch."""
    if position_ids is not None and position_ids.ndim == 1:
        position_ids = position_ids[None]
    rows = 0 if position_ids is None else position_ids.shape[0]
    if position_ids is not None and position_ids.shape[-1] != q.shape[2]:
        raise LongctxError(f"position_ids length {position_ids.shape[-1]} differs from the local sequence length {q.shape[2]}")
    mine = torch.tensor([q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[3], v.shape[3], rows], device=q.device)
    shapes = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(shapes, mine, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) != 1:
        raise LongctxError(
            f"Ulysses shapes differ across ranks (batch, seq_local, heads, kv_heads, head_dim, v_dim, position rows per "
            f"rank: {shapes}); shard one padded sequence with shard_for_sequence_parallel on every rank"
        )
    if q.shape[2] % 2:
        raise LongctxError(
            f"local sequence length {q.shape[2]} is odd, but a zigzag shard is two equal chunks; "
            "pad the full sequence to a multiple of 2 x sequence_parallel with pad_for_zigzag before sharding"
        )
    check_heads(q.shape[1], k.shape[1], size)
    if position_ids is None:
        return None
    position_ids = position_ids.to(device=q.device, dtype=torch.long).contiguous()
    gathered = [torch.empty_like(position_ids) for _ in range(size)]
    dist.all_gather(gathered, position_ids, group=group)
    return zigzag_unshard(gathered, dim=1)


def ulysses_attention_bhsd(q, k, v, *, group=None, ring_group=None, causal=True, softmax_scale=None, backend="auto",
                           position_ids=None):
    """ulysses_attention on [batch, heads, seq_local, head_dim] tensors (the layout transformers passes)."""
    check_local_shapes(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    _, size = group_rank_and_size(group)
    ring_rank, ring_size = group_rank_and_size(ring_group) if ring_group is not None else (0, 1)
    if size == 1:
        return attention_over_ring(q, k, v, ring_group, ring_rank, ring_size, causal=causal,
                                   softmax_scale=softmax_scale, backend=backend, position_ids=position_ids)
    group = group if group is not None else dist.group.WORLD
    _check_layout(group, ring_group, size)
    positions = _gather_positions(position_ids, q, k, v, group, size)
    repeats = kv_head_repeats(k.shape[1], size)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    q, k, v = (_sequence_to_heads(t, group, size) for t in (q, k, v))
    out = attention_over_ring(q, k, v, ring_group, ring_rank, ring_size, causal=causal, softmax_scale=softmax_scale,
                              backend=backend, position_ids=positions)
    return _heads_to_sequence(out, group, size)


def ulysses_attention(q, k, v, *, group=None, ring_group=None, causal=True, softmax_scale=None, backend="auto",
                      position_ids=None):
    """Attention of this rank's zigzag shard of q against the whole sequence: the all-to-all over heads
    inside `group` (the Ulysses group; None: WORLD), then the ring across groups over `ring_group`
    (None: no ring, Ulysses alone).

    q [batch, seq_local, heads, head_dim], k and v [batch, seq_local, kv_heads, head_dim]: this rank's
    zigzag shard over all sequence-parallel ranks (zigzag_shard with the rank's sequence-parallel rank
    and P), heads divisible by the group's size U. The groups must have the layout
    new_sequence_parallel_groups builds (consecutive ranks in a group, rings through every U-th rank).
    Returns this rank's output [batch, seq_local, heads, head_dim], differentiable in q, k, v.
    position_ids, backend: as ring_attention (backend applies to the attention after the all-to-all).
    """
    out = ulysses_attention_bhsd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=group, ring_group=ring_group,
        causal=causal, softmax_scale=softmax_scale, backend=backend, position_ids=position_ids,
    )
    return out.transpose(1, 2)
