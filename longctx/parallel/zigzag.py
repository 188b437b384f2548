"""Zigzag sharding of a sequence over the ranks of a ring, and the batch helpers built on it.

The sequence is cut into 2·P chunks; rank r holds chunks r and 2P-1-r. Under causal attention the
early chunk is cheap and the late one expensive, so every rank gets the same amount of work.
"""

from __future__ import annotations

import torch

from longctx.errors import LongctxError
from longctx.labels import IGNORE_INDEX


def _check_divisible(length: int, world_size: int, what: str) -> None:
    if world_size < 1:
        raise LongctxError(f"world_size must be at least 1, got {world_size}")
    if world_size > 1 and length % (2 * world_size):
        raise LongctxError(
            f"{what} length {length} is not divisible by 2 x world_size = {2 * world_size}; "
            "pad the batch first with longctx.parallel.pad_for_zigzag"
        )


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s zigzag shard of `x` along `dim`: chunks rank and 2·world_size-1-rank, concatenated.

    A group of one holds the whole sequence: `x` itself, of any length.
    """
    if not 0 <= rank < world_size:
        raise LongctxError(f"rank {rank} is outside the group of size {world_size}")
    _check_divisible(x.shape[dim], world_size, "sequence")
    if world_size == 1:
        return x
    chunks = x.chunk(2 * world_size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=dim)


def zigzag_unshard(chunks: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Put the per-rank zigzag shards (a list in rank order) back in sequence order."""
    world_size = len(chunks)
    if world_size == 0:
        raise LongctxError("zigzag_unshard needs at least one shard")
    lengths = {c.shape[dim] for c in chunks}
    if len(lengths) != 1 or lengths.pop() % 2:
        raise LongctxError("zigzag shards must all have the same even length along the sequence dim")
    halves = [c.chunk(2, dim=dim) for c in chunks]
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim=dim)


def zigzag_global_indices(local_length: int, rank: int, world_size: int, device=None) -> torch.Tensor:
    """Global sequence index of each of rank `rank`'s `local_length` tokens (int64, shape [local_length])."""
    half = local_length // 2
    local = torch.arange(half, device=device)
    return torch.cat([rank * half + local, (2 * world_size - 1 - rank) * half + local])


def pad_for_zigzag(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    world_size: int,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pad [batch, seq] tensors at the end to a multiple of 2·world_size.

    input_ids get `pad_token_id`, labels -100 (no loss on padding), and position_ids keep increasing
    from the last one, so padding belongs to the last document and never starts a new one. Without
    position_ids, 0..seq-1 is assumed (and returned padded).
    """
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    if labels is not None and labels.shape != input_ids.shape:
        raise LongctxError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    if position_ids.shape[-1] != length:
        raise LongctxError(f"position_ids length {position_ids.shape[-1]} differs from input_ids length {length}")
    if world_size < 1:
        raise LongctxError(f"world_size must be at least 1, got {world_size}")
    missing = -length % (2 * world_size)
    if missing == 0:
        return input_ids, labels, position_ids
    input_ids = torch.nn.functional.pad(input_ids, (0, missing), value=pad_token_id)
    if labels is not None:
        labels = torch.nn.functional.pad(labels, (0, missing), value=IGNORE_INDEX)
    steps = torch.arange(1, missing + 1, device=position_ids.device, dtype=position_ids.dtype)
    tail = position_ids[..., -1:] + steps
    position_ids = torch.cat([position_ids.expand(batch, length), tail.expand(batch, missing)], dim=-1)
    return input_ids, labels, position_ids


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF-style labels (aligned with input_ids) -> the target of each position: labels[i+1], -100 at the end."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def shard_for_sequence_parallel(
    batch: dict[str, torch.Tensor], rank: int, world_size: int, *, labels_shifted: bool = False
) -> dict[str, torch.Tensor]:
    """One rank's slice of a [batch, seq] training batch, zigzag-sharded.

    Reads `input_ids`, optional `labels` (HF-style, aligned with input_ids: the model would shift
    them) and optional `position_ids` (default 0..seq-1; restarts at 0 mark packed documents).
    Returns `input_ids`, `position_ids` (global positions, so RoPE rotates by the true position) and,
    when labels were given, `shift_labels`: labels shifted over the WHOLE sequence before sharding,
    so `shift_labels[i]` is the target of `input_ids[i]` even at a shard boundary. Compute the loss
    from them directly (see `sequence_parallel_loss`); do not pass them as `labels=` to the model,
    which would shift them a second time. `labels_shifted=True` says the labels already are those
    targets (as `longctx.train.data` packs them, -100 at each document's end): they are sharded
    unchanged. An all-ones `attention_mask` is dropped; any other raises, since padding is
    expressed with labels -100 (see `pad_for_zigzag`). Other keys pass through. A group of one
    (world_size 1) gets the whole batch, of any length.
    """
    if "input_ids" not in batch:
        raise LongctxError("the batch has no input_ids")
    input_ids = batch["input_ids"]
    if input_ids.ndim != 2:
        raise LongctxError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    _check_divisible(length, world_size, "input_ids")
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    elif position_ids.shape[-1] != length:
        raise LongctxError(f"position_ids length {position_ids.shape[-1]} differs from input_ids length {length}")

    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise LongctxError(
            "sequence parallelism takes no padding attention_mask; pad with pad_for_zigzag (labels -100) "
            "and mark packed documents with position_ids restarting at 0"
        )

    shard = {key: value for key, value in batch.items() if key not in ("input_ids", "labels", "position_ids", "attention_mask")}
    shard["input_ids"] = zigzag_shard(input_ids, rank, world_size)
    shard["position_ids"] = zigzag_shard(position_ids.expand_as(input_ids), rank, world_size)
    labels = batch.get("labels")
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise LongctxError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
        targets = labels if labels_shifted else shift_labels(labels)
        shard["shift_labels"] = zigzag_shard(targets, rank, world_size)
    return shard
