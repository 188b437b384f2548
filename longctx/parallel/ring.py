"""Zigzag ring attention over a torch.distributed process group.

Each rank holds its zigzag shard of q, k and v (chunks r and 2P-1-r of the sequence). Key/value
shards travel around the ring (rank r sends to r+1, receives from r-1) by batched isend/irecv,
posted before the block's attention is computed so that communication overlaps compute. At ring
step s rank r holds the key/values of rank src = r - s, and the zigzag layout fixes which part of
the block is needed under causal attention (each is half of a full block, so every rank does the
same work):
  step 0        local q  x local k/v, causal (the local layout is in sequence order);
  src < rank    all q    x first half of k/v (chunk src is before both of our chunks);
  src > rank    second half of q x all k/v (our late chunk is after both of theirs).
Each block is computed as tiles cut at the zigzag halves, one query head per kernel call, so a
call's outputs and gradients are a quarter of one head's block. Partial results are merged in
float32 in the log-sum-exp form. The backward is a second ring, one KV head at a time: each
head's k, v and its float32 dK/dV accumulators travel one tensor at a time (a conveyor, one tensor
in flight, advanced between kernel calls), and the accumulators arrive home after a full turn.
Saved for backward: q, k, v, out and lse, i.e. O(local sequence), like flash attention. Peak
memory of one forward+backward per rank (in units of one head's [seq_local, head_dim] float32
tensor, with GQA heads h and kv heads g): inputs, output gradient, output and dq (4h + 2g), one
step's k, v, dK, dV (4g), one tensor in transit and one tile's gradients.

Packed documents: position_ids that restart at 0 mark document starts. A query at global index i
with position p starts its document at i - p, so it may attend key j iff i - p <= j (and j <= i
under causal attention). This needs only the query's own position ids and the key's global index,
which the zigzag layout gives, so no document ids travel around the ring.
"""

from __future__ import annotations

import importlib.util
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.errors import LongctxError
from longctx.attention.blocks import NEG_INF, block_backward, block_forward, choose_kernel, merge_into
from longctx.parallel.zigzag import zigzag_global_indices

BACKENDS = ("auto", "torch", "torch-math", "ring-flash-attn")


class _Ring:
    """Neighbour exchange on a process group: send to rank+1, receive from rank-1."""

    def __init__(self, group):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor], tag: int):
        """Post the sends of `tensors` and the receives of their neighbour's; returns a handle for wait()."""
        sendable = [_sendable(t) for t in tensors]
        received = [torch.empty_like(t) for t, _ in sendable]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t, _ in sendable]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in received]
        requests = dist.batch_isend_irecv(ops)
        return [r.transpose(1, 2) if swapped else r for r, (_, swapped) in zip(received, sendable)], requests

    @staticmethod
    def wait(pending) -> list[torch.Tensor]:
        received, requests = pending
        for request in requests:
            request.wait()
        return received


def _sendable(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A contiguous tensor to send for t, without a copy when t is a [b, s, h, d] tensor seen as [b, h, s, d]."""
    if t.is_contiguous():
        return t, False
    if t.transpose(1, 2).is_contiguous():
        return t.transpose(1, 2), True
    return t.contiguous(), False


_KV_TAG, _CONVEYOR_TAG = 0, 1


class _Conveyor:
    """Moves tensors one hop along the ring (to rank+1, from rank-1), one at a time, in the order they are queued.

    Every rank queues the same sequence of (key, tensor); the tensor that arrives under a key is the
    previous rank's. At most one tensor is in flight: pump() completes it (freeing the sent copy)
    and posts the next, and is called between kernel calls, so each transfer overlaps one kernel
    call while the memory in transit is one tensor, not whole K/V and dK/dV blocks.
    """

    def __init__(self, ring: _Ring):
        self.ring = ring
        self.queued: deque[tuple[tuple, torch.Tensor]] = deque()
        self.in_flight: tuple[tuple, tuple] | None = None
        self.arrived: dict[tuple, torch.Tensor] = {}

    def send(self, key: tuple, tensor: torch.Tensor) -> None:
        self.queued.append((key, tensor))

    def pump(self) -> None:
        if self.in_flight is not None:
            key, pending = self.in_flight
            self.in_flight = None
            (self.arrived[key],) = _Ring.wait(pending)
        if self.queued:
            key, tensor = self.queued.popleft()
            self.in_flight = key, self.ring.start([tensor], _CONVEYOR_TAG)

    def receive(self, key: tuple) -> torch.Tensor:
        while key not in self.arrived:
            if self.in_flight is None and not self.queued:
                raise RuntimeError(f"ring conveyor: {key} was never sent")
            self.pump()
        return self.arrived.pop(key)


@dataclass(frozen=True)
class _RingConfig:
    ring: _Ring | None  # None: a group of one, plain attention
    rank: int
    world_size: int
    scale: float
    causal: bool
    kernel: str  # "cpu-flash", "cuda-flash", "cuda-efficient" or "math" (see longctx/attention/blocks.py)


@dataclass(frozen=True)
class _Tile:
    q: slice
    k: slice
    causal: bool


def _tiles_for_step(step: int, rank: int, world_size: int, seq_local: int, causal: bool) -> list[_Tile]:
    """The (query rows, key rows) tiles of this rank's block at a ring step, cut at the zigzag halves.

    Each tile is at most half x half of the local length, so one kernel call's output and
    gradients are a quarter of a full block's. Every rank gets the same work: two full tiles, or
    at step 0 one full and two causal (half) tiles.
    """
    half = seq_local // 2
    early, late = slice(0, half), slice(half, seq_local)
    if not causal:
        tiles = [_Tile(q, k, False) for q in (early, late) for k in (early, late)]
    elif step == 0:  # the local layout is in sequence order
        tiles = [_Tile(early, early, True), _Tile(late, early, False), _Tile(late, late, True)]
    elif (rank - step) % world_size < rank:  # its early chunk precedes both of ours, its late one follows both
        tiles = [_Tile(early, early, False), _Tile(late, early, False)]
    else:  # both source chunks lie between our early and late chunks
        tiles = [_Tile(late, early, False), _Tile(late, late, False)]
    return [t for t in tiles if t.q.start < t.q.stop and t.k.start < t.k.stop]


def _global_indices(seq_local: int, rank: int, world_size: int, device) -> torch.Tensor:
    if world_size == 1:
        return torch.arange(seq_local, device=device)
    return zigzag_global_indices(seq_local, rank, world_size, device=device)


def _tile_mask(tile: _Tile, doc_start, q_index, k_index):
    """The tile's boolean mask [b, 1, sq, sk], None when nothing is masked beyond plain causality, False when all is."""
    if doc_start is None:
        return None
    k_global = k_index[tile.k]
    allowed = k_global[None, None, :] >= doc_start[:, tile.q, None]
    if tile.causal:
        allowed = allowed & (k_global[None, None, :] <= q_index[tile.q][None, :, None])
    elif bool(allowed.all()):
        return None
    if not bool(allowed.any()):
        return False
    return allowed[:, None]


def _step_tiles(step: int, doc_start, q_index, config: _RingConfig) -> list[tuple[_Tile, torch.Tensor | None]]:
    """(tile, mask) for the tiles of this step that have anything to attend to."""
    seq_local = q_index.shape[0]
    source = (config.rank - step) % config.world_size
    k_index = _global_indices(seq_local, source, config.world_size, q_index.device)
    tiles = [(tile, _tile_mask(tile, doc_start, q_index, k_index))
             for tile in _tiles_for_step(step, config.rank, config.world_size, seq_local, config.causal)]
    return [(tile, allowed) for tile, allowed in tiles if allowed is not False]


def _ring_forward(q, k, v, doc_start, config: _RingConfig):
    """(out float32 [b, h, s, d] with q's memory layout, lse float32 [b, h, s]).

    The next step's K/V are posted whole before a step's tiles are computed (double buffering),
    so their transfer overlaps the step's compute. Each kernel call covers one query head and one
    tile, and is merged into `out` at once, so the transient is a quarter of one head's output.
    """
    batch, heads, seq_local, _ = q.shape
    group_size = heads // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float32)  # [b, s, h, d] in memory when q is: the caller's transpose is free
    lse = torch.full((batch, heads, seq_local), NEG_INF, dtype=torch.float32, device=q.device)
    q_index = _global_indices(seq_local, config.rank, config.world_size, q.device)
    k_cur, v_cur = k, v
    for step in range(config.world_size):
        pending = config.ring.start([k_cur, v_cur], _KV_TAG) if step + 1 < config.world_size else None
        for tile, allowed in _step_tiles(step, doc_start, q_index, config):
            for head in range(heads):
                kv_head = slice(head // group_size, head // group_size + 1)
                rows = (slice(None), slice(head, head + 1), tile.q)
                tile_out, tile_lse = block_forward(
                    config.kernel, q[rows], k_cur[:, kv_head, tile.k], v_cur[:, kv_head, tile.k],
                    config.scale, tile.causal, allowed,
                )
                merge_into(out[rows], lse[rows], tile_out, tile_lse)
                del tile_out, tile_lse
        if pending is not None:
            k_cur, v_cur = _Ring.wait(pending)
            del pending  # the sent buffers: free the previous step's k/v now
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, doc_start, config: _RingConfig):
    """(dq, dk, dv) in float32 with q's, k's and v's memory layout.

    A second ring, one KV head at a time: at each step, for each KV head, take its k, v and the
    float32 dK/dV accumulators that travel with them, add this rank's tiles (final out/lse make each
    tile's gradients exact), and hand all four to the conveyor for the next rank. dq accumulates in
    place. After the last step only dK/dV move on, and one more hop brings every rank its own.
    What this rank holds at once is its inputs, dq, one step's K/V + dK/dV (spread over the KV heads,
    current or already received), one tensor in transit and one tile's gradients.
    """
    batch, heads, seq_local, _ = q.shape
    kv_heads = k.shape[1]
    group_size = heads // kv_heads
    dq = torch.zeros_like(q, dtype=torch.float32)
    # the returned dK/dV, in k's and v's layout; without a ring they are accumulated in place
    dk = torch.zeros_like(k, dtype=torch.float32) if config.ring is None else torch.empty_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32) if config.ring is None else torch.empty_like(v, dtype=torch.float32)
    conveyor = _Conveyor(config.ring) if config.ring is not None else None
    q_index = _global_indices(seq_local, config.rank, config.world_size, q.device)
    last_step = config.world_size - 1
    for step in range(config.world_size):
        tiles = _step_tiles(step, doc_start, q_index, config)
        for kv_head in range(kv_heads):
            if conveyor is None:
                heads_of = slice(kv_head, kv_head + 1)
                k_h, v_h, dk_h, dv_h = k[:, heads_of], v[:, heads_of], dk[:, heads_of], dv[:, heads_of]
            elif step == 0:
                k_h, v_h = k[:, kv_head:kv_head + 1], v[:, kv_head:kv_head + 1]
                dk_h = torch.zeros(k_h.shape, dtype=torch.float32, device=k.device)
                dv_h = torch.zeros(v_h.shape, dtype=torch.float32, device=v.device)
            else:
                k_h, v_h, dk_h, dv_h = (conveyor.receive((step - 1, name, kv_head)) for name in ("k", "v", "dk", "dv"))
            for tile, allowed in tiles:
                for head in range(kv_head * group_size, (kv_head + 1) * group_size):
                    if conveyor is not None:
                        conveyor.pump()
                    rows = (slice(None), slice(head, head + 1), tile.q)
                    dq_tile, dk_tile, dv_tile = block_backward(
                        config.kernel, dout[rows], q[rows], k_h[:, :, tile.k], v_h[:, :, tile.k], out[rows], lse[rows],
                        config.scale, tile.causal, allowed,
                    )
                    dq[rows] += dq_tile
                    dk_h[:, :, tile.k] += dk_tile
                    dv_h[:, :, tile.k] += dv_tile
                    del dq_tile, dk_tile, dv_tile
            if conveyor is not None:
                moving = {"dk": dk_h, "dv": dv_h} if step == last_step else {"k": k_h, "v": v_h, "dk": dk_h, "dv": dv_h}
                for name, tensor in moving.items():
                    conveyor.send((step, name, kv_head), tensor)
                del moving
            del k_h, v_h, dk_h, dv_h
    if conveyor is not None:  # one more hop: every rank's own dK/dV come home
        for kv_head in range(kv_heads):
            dk[:, kv_head:kv_head + 1].copy_(conveyor.receive((last_step, "dk", kv_head)))
            dv[:, kv_head:kv_head + 1].copy_(conveyor.receive((last_step, "dv", kv_head)))
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_start, config: _RingConfig):
        out, lse = _ring_forward(q, k, v, doc_start, config)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_start)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc_start = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, doc_start, ctx.config)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def flash_attn_available() -> bool:
    """Whether flash_attn (which ring-flash-attn needs) imports."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):  # installed but built against another torch or CUDA, or a library missing
        return False
    return True


def group_rank_and_size(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise LongctxError("a process group was given but torch.distributed is not initialized; call dist.init_process_group first")
        return 0, 1
    group = group if group is not None else dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)


def check_local_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise LongctxError("ring attention takes 4-D q, k, v tensors")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise LongctxError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match: "
            "expected [batch, seq, heads, head_dim] with the same batch and seq, k and v with the same kv heads"
        )
    if q.shape[2] % k.shape[2]:
        raise LongctxError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise LongctxError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")


def _check_same_shapes_across_ranks(q, k, v, group, packed: bool) -> bool:
    """All ranks must hold shards of one sequence: compare (batch, seq, heads, kv_heads, head_dim) with an all_gather.

    The same all_gather tells every rank whether any rank has packed documents, so that all of them
    choose the same backend. Returns that.
    """
    mine = torch.tensor([q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[3], v.shape[3], int(packed)],
                        device=q.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    shapes = [tuple(t[:-1].tolist()) for t in gathered]
    if len(set(shapes)) != 1:
        raise LongctxError(
            f"ring attention shapes differ across ranks (batch, seq_local, heads, kv_heads, head_dim, v_dim per rank: {shapes}); "
            "shard one padded sequence with shard_for_sequence_parallel on every rank"
        )
    return any(int(t[-1]) for t in gathered)


def _resolve_backend(backend: str, q: torch.Tensor, causal: bool, packed: bool, ring: bool) -> str:
    if backend not in BACKENDS:
        raise LongctxError(f"unknown ring attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    ring_flash_fits = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and causal and not packed and ring
    if backend == "ring-flash-attn":
        if not flash_attn_available():
            raise LongctxError(
                "backend 'ring-flash-attn' needs flash-attn, which is not installed (it needs CUDA and a source build); "
                "install flash-attn or use backend='torch'"
            )
        if not ring_flash_fits:
            raise LongctxError(
                "backend 'ring-flash-attn' runs causal attention on CUDA fp16/bf16 tensors without packed documents, "
                "over a ring of 2 or more ranks; use backend='torch' for this input"
            )
        return backend
    if backend == "auto":
        return "ring-flash-attn" if ring_flash_fits and flash_attn_available() else "torch"
    return backend


def document_starts(position_ids: torch.Tensor | None, seq_local: int, rank: int, world_size: int, device):
    """Global index where each local token's document starts ([b, seq_local] int64), or None if one document.

    Positions are assumed to count up by one within a document and restart at 0 at its start.
    """
    if position_ids is None:
        return None
    if position_ids.ndim == 1:
        position_ids = position_ids[None]
    if position_ids.shape[-1] != seq_local:
        raise LongctxError(f"position_ids length {position_ids.shape[-1]} differs from the local sequence length {seq_local}")
    starts = _global_indices(seq_local, rank, world_size, device)[None] - position_ids.to(device=device, dtype=torch.long)
    if not bool((starts > 0).any()):
        return None
    return starts


def ring_attention_bhsd(q, k, v, *, group=None, causal=True, softmax_scale=None, backend="auto", position_ids=None):
    """ring_attention on [batch, heads, seq_local, head_dim] tensors (the layout transformers passes)."""
    check_local_shapes(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    rank, world_size = group_rank_and_size(group)
    return attention_over_ring(q, k, v, group, rank, world_size, causal=causal, softmax_scale=softmax_scale,
                               backend=backend, position_ids=position_ids)


def attention_over_ring(q, k, v, group, rank: int, world_size: int, *, causal=True, softmax_scale=None,
                        backend="auto", position_ids=None):
    """ring_attention_bhsd at a given place in the ring (rank of world_size in `group`; world_size 1:
    this process alone, whatever `group` is), for callers that know it (the Ulysses hybrid)."""
    seq_local = q.shape[2]
    zigzag_layout = world_size == 1 or seq_local % 2 == 0  # an odd shard is refused below, on every rank
    doc_start = document_starts(position_ids, seq_local, rank, world_size, q.device) if zigzag_layout else None
    if doc_start is not None and doc_start.shape[0] not in (1, q.shape[0]):
        raise LongctxError(f"position_ids batch {doc_start.shape[0]} differs from the q batch {q.shape[0]}")
    packed = doc_start is not None
    if world_size > 1:
        group = group if group is not None else dist.group.WORLD
        packed = _check_same_shapes_across_ranks(q, k, v, group, packed)
        if causal and seq_local % 2:
            raise LongctxError(
                f"local sequence length {seq_local} is odd, but a zigzag shard is two equal chunks; "
                "pad the full sequence to a multiple of 2 x world_size with pad_for_zigzag before sharding"
            )
    if packed and not causal:
        raise LongctxError(
            "packed documents (position_ids restarting at 0) are supported with causal attention only; "
            "pass one document per sequence for non-causal attention"
        )
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    chosen = _resolve_backend(backend, q, causal, packed, ring=world_size > 1)
    if chosen == "ring-flash-attn":
        from ring_flash_attn import zigzag_ring_flash_attn_func

        out = zigzag_ring_flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True, group=group
        )
        return out.transpose(1, 2)
    kernel = choose_kernel(q, math_only=chosen == "torch-math")
    ring = _Ring(group) if world_size > 1 else None
    config = _RingConfig(ring, rank, world_size, scale, causal, kernel)
    return _RingAttention.apply(q, k, v, doc_start, config)


def ring_attention(q, k, v, *, group=None, causal=True, softmax_scale=None, backend="auto", position_ids=None):
    """Attention of this rank's zigzag shard of q against the whole sequence's k/v, held across the group.

    q [batch, seq_local, heads, head_dim], k and v [batch, seq_local, kv_heads, head_dim], each rank's
    zigzag shard (see zigzag_shard); returns this rank's output [batch, seq_local, heads, head_dim].
    Differentiable in q, k, v. `group`: the ring (None: WORLD; without torch.distributed initialized,
    plain attention). `position_ids` (this rank's shard of the global positions, [batch or 1,
    seq_local]) turn on packed-document masking where they restart at 0. Backends: "torch" (PyTorch's
    kernels as longctx.attention.blocks.choose_kernel picks them: the CPU flash kernel on CPU; on CUDA
    the flash kernel for float16/bfloat16, the memory-efficient one otherwise, each once it has matched
    the math kernel there; math elsewhere), "torch-math" (always the float32 math kernel),
    "ring-flash-attn" (CUDA, needs flash-attn; causal, no packed documents), "auto" (ring-flash-attn
    when it applies and imports, else torch).
    """
    out = ring_attention_bhsd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        group=group, causal=causal, softmax_scale=softmax_scale, backend=backend, position_ids=position_ids,
    )
    return out.transpose(1, 2)
