"""The `longctx_ring` attention implementation for transformers, registered through its public interfaces.

`AttentionInterface` gets the attention function (query/key/value arrive as [batch, heads, seq,
head_dim], already rotated with the position_ids the model was given). `AttentionMaskInterface`
gets a mask function that builds no [seq, seq] mask: the causal structure comes from the zigzag
layout and packed documents from position_ids, inside the ring. The one name runs the ring, Ulysses
or the hybrid, as the process groups set in groups.py say.
"""

from __future__ import annotations

import torch

from longctx.errors import LongctxError
from longctx.parallel.groups import get_sequence_parallel_groups
from longctx.parallel.ring import ring_attention_bhsd
from longctx.parallel.ulysses import ulysses_attention_bhsd

ATTENTION_NAME = "longctx_ring"


def longctx_ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attention_mask is not None:
        raise LongctxError(
            "longctx_ring takes no attention_mask; mark padding with labels -100 (pad_for_zigzag) "
            "and packed documents with position_ids restarting at 0"
        )
    if dropout:
        raise LongctxError("longctx_ring has no attention dropout; set the model's attention_dropout to 0")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise LongctxError("longctx_ring supports neither sliding-window attention nor logit softcapping")
    if query.shape[2] != key.shape[2]:
        raise LongctxError(
            "longctx_ring attends a zigzag-sharded sequence to itself and takes no KV cache; "
            "call the model with use_cache=False, and generate with attn_implementation='sdpa'"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    query, key, value = _as_sdpa_would(query, key, value)
    groups = get_sequence_parallel_groups()
    settings = dict(causal=causal, softmax_scale=scaling, position_ids=kwargs.get("position_ids"))
    if groups.ulysses is None:
        out = ring_attention_bhsd(query, key, value, group=groups.ring, **settings)
    else:
        out = ulysses_attention_bhsd(query, key, value, group=groups.ulysses, ring_group=groups.ring, **settings)
    return out.transpose(1, 2).contiguous(), None


def _as_sdpa_would(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in the one dtype sdpa would run them in: autocast's when it is on (transformers' rope
    hands over q and k in float32, promoted by its float32 cos/sin, beside a bfloat16 v), else their
    common type."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(tensor.to(dtype) for tensor in tensors)


def longctx_ring_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """No mask for the ring; a padding mask (any 0) is refused rather than silently dropped."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise LongctxError(
            "longctx_ring takes no padding attention_mask; pad with pad_for_zigzag (labels -100) instead"
        )
    return None


def register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, longctx_ring_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, longctx_ring_mask)
