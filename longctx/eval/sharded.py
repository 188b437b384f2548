"""A prompt's KV cache sharded across the ranks of a process group, and `longctx_sharded`, the
attention over it (a transformers attention implementation).

A prompt too long for one machine is evaluated by P processes (torchrun), each holding its share
of the KV cache and of the decoder layers' weights (`shard_weights`). Every rank runs the same engine code on the same token ids;
each forward pass over the cache (a `ShardedPass`) is one of two kinds:

- split (a prefill chunk of at least P tokens): the chunk is cut into P contiguous pieces; rank r
  runs piece r through the model with its global position_ids (so its activations are a piece's)
  and stores the piece's keys and values. In each attention call the ranks all-gather the chunk's
  queries (a chunk's, never the prompt's), each attends every query over the keys it holds (those
  of earlier passes in full, its new piece causally) with the log-sum-exp, and the partial
  results are combined across ranks (attention/blocks.py's merge, as an all-reduce of the peak
  lse and then of the weighted outputs with their weights); rank r keeps its piece's rows.
- replicated (decode steps, chunks shorter than P): every rank runs the same tokens, the ranks
  holding the fewest keys store one each, and the same combine gives every rank every row.
Either way the tokens a split cannot share equally go to the ranks holding the fewest keys, so
the shares stay within a token of each other.

The kept logits of a pass come from the ranks that computed them (split) or from rank 0
(replicated), so every rank acts on the same logits and picks the same next token. Which global
positions each rank holds (the `ShardLayout`) is known on every rank: starting a prompt on the
reused prefix and dropping a rejected draft need no communication. A prompt's cache reads the
prefix's keys in place (its attention takes them as one more block, as the one-process engine's
does on the CPU), so a rank holds its share of the prefix once.

The model is a stock transformers model, run through transformers' public interfaces: the pass
reaches every attention call as one keyword argument of the model call (transformers hands a
model's extra keyword arguments on to its attention functions, as it does flash attention's
varlen ones), and the mask function builds no mask.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.attention.blocks import NEG_INF, block_forward, choose_kernel, merge_into
from longctx.errors import LongctxError
from longctx.eval.cache import cache_keyword, keep_heap_small, reserved_layer_class

ATTENTION_NAME = "longctx_sharded"
PASS_KEYWORD = "longctx_shard"
REPLACES = ("sdpa", "eager")  # plain causal attention, which longctx_sharded computes across ranks
_GQA_KERNELS = ("cpu-flash", "math")  # kernels that take fewer key/value heads than query heads


@dataclass(frozen=True)
class Sharding:
    """The process group a cache is sharded over, and this process's place in it."""

    group: object  # a torch.distributed process group (None: the WORLD group)
    rank: int
    size: int

    @classmethod
    def of(cls, group=None) -> Sharding:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group if self.group is not None else dist.group.WORLD, rank)

    def new_cache(self, capacity: int = 0):
        """An empty sharded cache with room on each rank for its share of `capacity` positions."""
        return _sharded_cache_class()(self, ShardLayout.empty(self.size), capacity)


@dataclass
class ShardLayout:
    """The global positions each rank holds: per rank, its runs (start, length) in position order."""

    runs: list[list[tuple[int, int]]]

    @classmethod
    def empty(cls, size: int) -> ShardLayout:
        return cls([[] for _ in range(size)])

    @property
    def length(self) -> int:
        return sum(self.held(rank) for rank in range(len(self.runs)))

    def held(self, rank: int) -> int:
        return sum(length for _, length in self.runs[rank])

    def add(self, rank: int, start: int, length: int) -> None:
        self.runs[rank].append((start, length))

    def cropped(self, length: int) -> ShardLayout:
        """The layout of the first `length` global positions."""
        return ShardLayout([[(start, min(size, length - start)) for start, size in runs if start < length]
                            for runs in self.runs])


@dataclass(frozen=True)
class ShardedPass:
    """One forward pass over a sharded cache, the same object on every rank but for `sharding.rank`."""

    sharding: Sharding
    start: int  # global position of the pass's first token
    length: int  # tokens in the pass
    split: bool  # each rank runs its piece (True) or every rank runs all tokens (False)
    stored: tuple[int, ...]  # tokens each rank stores (split: the piece it runs), consecutive runs in rank order
    held_before: tuple[int, ...]  # keys each rank held before the pass
    base: tuple | None = None  # this rank's (keys, values) per layer of a shared prefix, read not copied

    def first_row(self, rank: int) -> int:
        """The pass row (0 = its first token) of the first key `rank` stores: the ranks store
        consecutive runs of the pass, in rank order."""
        return sum(self.stored[:rank])

    @classmethod
    def plan(cls, sharding: Sharding, layout: ShardLayout, length: int, base: tuple | None = None) -> ShardedPass:
        held = tuple(layout.held(rank) for rank in range(sharding.size))
        fewest_first = sorted(range(sharding.size), key=lambda rank: (held[rank], rank))
        if length >= sharding.size:  # the tokens left over after equal pieces go to the ranks holding fewest keys
            extra = set(fewest_first[: length % sharding.size])
            stored = tuple(length // sharding.size + (rank in extra) for rank in range(sharding.size))
            return cls(sharding, layout.length, length, True, stored, held, base)
        stored = tuple(int(rank in fewest_first[:length]) for rank in range(sharding.size))  # a token each
        return cls(sharding, layout.length, length, False, stored, held, base)


@functools.cache
def _sharded_cache_class():
    """The ShardedCache class (made on first use: transformers is imported lazily)."""
    from transformers import DynamicCache

    class ShardedLayer(reserved_layer_class()):
        """This rank's share of one layer's keys and values, in place in reserved buffers."""

        def __init__(self, cache, capacity: int = 0):
            super().__init__(capacity)
            self.sharded = cache

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            current = self.sharded.current
            if current is None:
                raise LongctxError("a sharded KV cache is run through its own run(); call the engine's prefill, "
                                   "not the model directly")
            rank = current.sharding.rank
            if current.stored[rank]:
                if current.split:  # the rank ran its piece only
                    return self.store(key_states, value_states)
                first = current.first_row(rank)
                return self.store(key_states[..., first : first + current.stored[rank], :],
                                  value_states[..., first : first + current.stored[rank], :])
            if not self.is_initialized or self.keys.numel() == 0:
                return key_states[..., :0, :], value_states[..., :0, :]
            return self.keys, self.values

        def store(self, key_states: torch.Tensor, value_states: torch.Tensor):
            return super().update(key_states, value_states)

    class ShardedCache(DynamicCache):
        """A DynamicCache holding this rank's share of a prompt's keys and values.

        get_seq_length is the global length (what position the next token has). This rank's
        positions (those `layout` gives it, in position order) are the `base` (a read-only view of
        another cache's first keys, per layer: the reused prefix, not copied) followed by what
        each layer holds itself."""

        def __init__(self, sharding: Sharding, layout: ShardLayout, capacity: int = 0, base: tuple | None = None):
            super().__init__()
            self.sharding, self.layout, self.base = sharding, layout, base
            self.base_held = base[0][0].shape[-2] if base else 0
            local_capacity = -(-capacity // sharding.size) + 1 if capacity else 0
            self.layer_class_to_replicate = functools.partial(ShardedLayer, self, local_capacity)
            self.current: ShardedPass | None = None

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.layout.length

        def run(self, model, ids: list[int], keep: int) -> torch.Tensor | None:
            """ids run on top of the cache as one pass across the ranks: the logits (float32, keep x vocab,
            the same on every rank) of the pass's last `keep` positions, or None for keep=0."""
            if not 0 <= keep <= len(ids):
                raise ValueError(f"cannot keep {keep} positions of a pass of {len(ids)}")
            shard = ShardedPass.plan(self.sharding, self.layout, len(ids), self.base)
            rank = self.sharding.rank
            first = shard.first_row(rank) if shard.split else 0
            mine = shard.stored[rank] if shard.split else len(ids)
            kept_here = max(0, first + mine - max(first, len(ids) - keep)) if shard.split else keep
            positions = torch.arange(shard.start + first, shard.start + first + mine, device=model.device)[None]
            self.current = shard
            try:
                logits = model(
                    input_ids=torch.tensor([ids[first : first + mine]], device=model.device), position_ids=positions,
                    use_cache=True, logits_to_keep=max(kept_here, 1), **{cache_keyword(model): self, PASS_KEYWORD: shard},
                ).logits[0]
            finally:
                self.current = None
            for other, stored in enumerate(shard.stored):
                if stored:
                    self.layout.add(other, shard.start + shard.first_row(other), stored)
            if not keep:
                return None
            group = self.sharding.group
            if not shard.split:
                kept = logits[-keep:].float().contiguous()
                dist.broadcast(kept, src=self.sharding.global_rank(0), group=group)
                return kept
            kept = logits.new_zeros(keep, logits.shape[-1], dtype=torch.float32)
            if kept_here:  # this rank's kept rows are the last of its piece; other ranks add zeros to them
                end = first + mine - (len(ids) - keep)
                kept[end - kept_here : end] = logits[-kept_here:].float()
            dist.all_reduce(kept, group=group)
            return kept

        def continuation(self, length: int, capacity: int = 0):
            """A new sharded cache that starts with this one's first `length` global positions, read in
            place (never copied: this cache must only grow while the new one is in use), with room
            for `capacity` positions in all."""
            if self.base is not None:
                raise ValueError("a continuation of a continuation: continue the cache it continues")
            layout = self.layout.cropped(length)
            held = layout.held(self.sharding.rank)
            base = tuple((layer.keys[..., :held, :], layer.values[..., :held, :]) for layer in self.layers) if held else None
            return ShardedCache(self.sharding, layout, max(capacity - length, 0), base)

        def keep_first(self, length: int) -> None:
            """Drop every global position from `length` on."""
            self.layout = self.layout.cropped(length)
            held = self.layout.held(self.sharding.rank)
            if held < self.base_held:
                self.base = tuple((keys[..., :held, :], values[..., :held, :]) for keys, values in self.base) if held else None
                self.base_held = held
            for layer in self.layers:
                if layer.is_initialized and layer.keys.numel():
                    layer.keep_first(held - self.base_held)

    return ShardedCache


def is_sharded(cache) -> bool:
    return isinstance(cache, _sharded_cache_class())


def shard_weights(model, sharding: Sharding) -> None:
    """Keep on this rank only its 1/P of every decoder layer's weights (FSDP2, as `longctx train`
    shards them): each layer's are all-gathered for its forward and freed after it. The embeddings,
    final norm and head stay whole on every rank (parallel/fsdp.py says why). Every rank must run
    every forward pass, as the sharded cache's passes do."""
    from torch.distributed.device_mesh import DeviceMesh

    from longctx.parallel.fsdp import shard_decoder_layers

    keep_heap_small()  # before the shards are copied and the first layer gathered (cache.py says why)
    group = sharding.group if sharding.group is not None else dist.group.WORLD
    mesh = DeviceMesh.from_group(group, model.device.type)
    shard_decoder_layers(model, model.get_decoder().layers, mesh, shard_root=False)


# Running across ranks -------------------------------------------------------------------------


def torchrun_world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(sequence_parallel: int) -> None:
    """Refuse, before any work, a --sequence-parallel that is not the number of processes torchrun started."""
    world_size = torchrun_world_size()
    if sequence_parallel < 1:
        raise LongctxError(f"--sequence-parallel {sequence_parallel} must be at least 1")
    if sequence_parallel != world_size:
        if world_size == 1:
            raise LongctxError(f"--sequence-parallel {sequence_parallel} needs {sequence_parallel} processes; launch with "
                               f"torchrun --nproc-per-node {sequence_parallel} -m longctx needle ...")
        raise LongctxError(f"this is one of {world_size} processes (torchrun) but --sequence-parallel is "
                           f"{sequence_parallel}; pass --sequence-parallel {world_size}, or launch "
                           f"--nproc-per-node {sequence_parallel}")


@contextlib.contextmanager
def joined(sequence_parallel: int, device: str = "cpu"):
    """The Sharding of this process in a group of `sequence_parallel` torchrun processes (None for 1);
    the process group is set up for the block (gloo on the CPU, nccl on CUDA, each process on its
    own GPU: `rank_device`) and ended after it. `device`: a resolved --device."""
    check_world(sequence_parallel)
    if sequence_parallel == 1:
        yield None
        return
    started = not dist.is_initialized()
    if started:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(rank_device(device))
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        yield Sharding.of()
    finally:
        if started:
            dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The device of this torchrun process for a resolved --device: its own GPU (LOCAL_RANK) for cuda."""
    import os

    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def on_every_rank(sharding: Sharding | None, work):
    """work() on every rank: a LongctxError on any rank is raised on all of them (so no rank waits in a
    collective for one that gave up); otherwise work()'s result on this rank."""
    if sharding is None:
        return work()
    try:
        result, message = work(), None
    except LongctxError as error:
        result, message = None, str(error)
    messages = [None] * sharding.size
    dist.all_gather_object(messages, message, group=sharding.group)
    refused = next((text for text in messages if text is not None), None)
    if refused is not None:
        raise LongctxError(refused)
    return result


def from_rank_zero(sharding: Sharding | None, value):
    """Rank 0's value on every rank (a picklable object)."""
    if sharding is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=sharding.global_rank(0), group=sharding.group)
    return box[0]


# Attention ------------------------------------------------------------------------------------


def _attend(kernel: str, q, k, v, scale: float, causal: bool):
    """(out, lse) of q over k, v, GQA included: kernels without it get one call per query head of each group."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or kernel in _GQA_KERNELS:
        return block_forward(kernel, q, k, v, scale, causal, None)
    parts = [block_forward(kernel, q[:, j::groups].contiguous(), k, v, scale, causal, None) for j in range(groups)]
    out = torch.stack([o for o, _ in parts], dim=2).flatten(1, 2)  # query head kv * groups + j
    lse = torch.stack([lse for _, lse in parts], dim=2).flatten(1, 2)
    return out, lse


def local_partial(queries, key, value, scale: float, shard: ShardedPass, layer: int):
    """(out float32 [b, h, n, d], lse [b, h, n]) of the pass's n queries over the keys this rank holds
    for `layer` (key, value: those its cache layer holds itself, after the shared base): the base's
    and those of earlier passes (all before every query) in full, and this pass's piece causally
    (the queries from its first row on see it, up to their own position). Rows that see none of
    this rank's keys get out 0 and lse -inf."""
    rank = shard.sharding.rank
    batch, heads, rows, _ = queries.shape
    kernel = choose_kernel(queries)
    out = queries.new_zeros(batch, heads, rows, value.shape[-1], dtype=torch.float32)
    lse = queries.new_full((batch, heads, rows), NEG_INF, dtype=torch.float32)
    before, stored = shard.held_before[rank], shard.stored[rank]
    if shard.base is not None:
        base_key, base_value = shard.base[layer]
        merge_into(out, lse, *_attend(kernel, queries, base_key, base_value, scale, False))
        before -= base_key.shape[-2]
    if before:
        merge_into(out, lse, *_attend(kernel, queries, key[:, :, :before], value[:, :, :before], scale, False))
    if stored:
        first = shard.first_row(rank)
        new_key, new_value = key[:, :, before : before + stored], value[:, :, before : before + stored]
        for rows, causal in ((slice(first, first + stored), True), (slice(first + stored, rows), False)):
            if rows.start < rows.stop:
                merge_into(out[:, :, rows], lse[:, :, rows],
                           *_attend(kernel, queries[:, :, rows], new_key, new_value, scale, causal))
    return out, lse


def combine_across_ranks(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """The attention over every rank's keys from each rank's partial (out, lse) of the same queries:
    sum_r out_r exp(lse_r - m) / sum_r exp(lse_r - m), m the peak lse over the ranks. Every query sees
    some key (its own), so m is finite."""
    peak = lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - peak).unsqueeze(-1)
    packed = torch.cat([out.mul_(weight), weight], dim=-1)
    dist.all_reduce(packed, group=group)
    return packed[..., :-1] / packed[..., -1:]


def _gather_queries(query: torch.Tensor, shard: ShardedPass) -> torch.Tensor:
    """Every rank's piece of the pass's queries, in pass order ([b, h, n, d])."""
    most = max(shard.stored)
    local = torch.nn.functional.pad(query, (0, 0, 0, most - query.shape[2])).contiguous()
    parts = [torch.empty_like(local) for _ in range(shard.sharding.size)]
    dist.all_gather(parts, local, group=shard.sharding.group)
    return torch.cat([part[:, :, :stored] for part, stored in zip(parts, shard.stored)], dim=2)


def sharded_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              is_causal=None, **kwargs):
    shard = kwargs.get(PASS_KEYWORD)
    if shard is None:
        raise LongctxError(f"{ATTENTION_NAME} attends over a KV cache sharded across ranks and runs only in the "
                           "evaluation engine's passes (eval/sharded.py); load the model with attn_implementation='sdpa'")
    if attention_mask is not None or dropout or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise LongctxError(f"{ATTENTION_NAME} computes plain causal attention: no attention mask, dropout, sliding "
                           "window or logit softcapping; evaluate this model in one process (drop --sequence-parallel)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    queries = _gather_queries(query, shard) if shard.split else query
    out, lse = local_partial(queries, key, value, scale, shard, module.layer_idx)
    out = combine_across_ranks(out, lse, shard.sharding.group)
    if shard.split:
        first = shard.first_row(shard.sharding.rank)
        out = out[:, :, first : first + query.shape[2]]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def sharded_attention_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """No mask: causality comes from the pass's layout. A padding mask (any 0) is refused, not dropped."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise LongctxError(f"{ATTENTION_NAME} takes no padding attention_mask; evaluate one unpadded prompt at a time")
    return None


def register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sharded_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sharded_attention_mask)


def check_shardable(model) -> None:
    """Refuse, in one line, a model whose attention longctx_sharded cannot stand in for."""
    current = getattr(model.config, "_attn_implementation", None)
    if current not in REPLACES:
        raise LongctxError(
            f"--sequence-parallel computes plain causal attention across ranks, but this model attends with "
            f"{current!r}; evaluate it in one process (drop --sequence-parallel)"
        )


@contextlib.contextmanager
def sharded_attention(model):
    """Run a block with `longctx_sharded` attention (the model's own choice restored after)."""
    check_shardable(model)
    current = model.config._attn_implementation
    register_with_transformers()
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(current)
