"""Causal attention for prompts run on top of a KV cache, as the evaluation engine runs them.

When a chunk of q tokens follows p cached ones, transformers' `sdpa` gives SDPA an explicit
[q, p + q] mask: a causal mask aligned to the last key is not what SDPA's `is_causal` means
(that one is aligned to the first key). With an explicit mask the fused kernels cannot skip the
masked half of the causal block and pay for turning the mask into additive form; on the CPU a
needle suffix's attention costs 1.5-2x what it should.

`longctx_cached` splits the keys instead: the p cached keys in one block every query sees in
full, the last q keys in one plain causal block, and the two results merged by their
log-sum-exp (the ring's merge). No mask is built. It is used only where the mask would be
plain causality over the whole cache: its mask function hands anything else (padding,
sliding windows, packed documents, non-causal layers) to `sdpa_mask`, and the attention
function passes any mask it gets to `sdpa`, so other models and inputs run as before. CPU
models only (see `cached_attention`).

A reused haystack prefix is one more such block: given the `longctx_base` keyword (per layer, the
keys and values of the prefix, eval/cache.py's `continued_cache`), every query sees it in full,
so a prompt reads the prefix cache in place instead of holding a copy of it.
"""

from __future__ import annotations

import contextlib

import torch

from longctx.attention.blocks import block_forward, choose_kernel, merge_into
from longctx.errors import LongctxError

ATTENTION_NAME = "longctx_cached"
REPLACES = "sdpa"
BASE_KEYWORD = "longctx_base"  # model-call keyword: per layer, (keys, values) of a prefix read in place


def attention_after_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                          base: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of the last query.shape[2] positions of a sequence whose keys and values
    are key, value ([batch, heads, seq, head_dim]; fewer key/value heads for GQA), after `base`
    (keys, values of positions before all of them, every query sees them) if given."""
    kernel = choose_kernel(query)
    past = key.shape[2] - query.shape[2]
    if base is None and (query.shape[2] == 1 or past == 0):  # one query sees every key; or no cache: plain causal
        return block_forward(kernel, query, key, value, scale, past == 0, None)[0]
    blocks = [(base[0], base[1], False)] if base is not None else []
    if query.shape[2] == 1:
        blocks.append((key, value, False))
    else:
        if past:
            blocks.append((key[:, :, :past], value[:, :, :past], False))
        blocks.append((key[:, :, past:], value[:, :, past:], True))
    out, lse = None, None
    for block_key, block_value, causal in blocks:
        block_out, block_lse = block_forward(kernel, query, block_key, block_value, scale, causal, None)
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            merge_into(out, lse, block_out, block_lse)
    return out.to(query.dtype)


def cached_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    base = kwargs.pop(BASE_KEYWORD, None)
    if attention_mask is not None or dropout or kwargs.get("softcap") is not None:
        if base is not None:
            raise LongctxError(f"{ATTENTION_NAME} reads a reused prefix in place only under plain causal attention "
                               "(no mask, dropout or softcapping); evaluate this model with --no-prefix-reuse")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer_base = base[module.layer_idx] if base is not None else None
    return attention_after_cache(query, key, value, scale, layer_base).transpose(1, 2).contiguous(), None


def cached_attention_mask(*, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, allow_is_causal_skip: bool = True, local_size=None, **kwargs):
    """None when the queries are the last q_length of kv_length keys under plain causality (the
    attention above handles that without a mask); otherwise sdpa's own explicit mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    plain = (
        mask_function is causal_mask_function
        and allow_is_causal_skip
        and local_size is None
        and kv_offset == 0
        and isinstance(q_offset, int) and q_offset + q_length == kv_length
        and (attention_mask is None or bool(attention_mask.all()))
    )
    if plain:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function if mask_function is not None else causal_mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False, local_size=local_size, **kwargs)


def register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, cached_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, cached_attention_mask)


def takes_cached_attention(model) -> bool:
    """Whether `cached_attention` switches this model to `longctx_cached`: a CPU model using `sdpa`.

    CPU only: PyTorch's CPU flash kernel takes fewer key/value heads than query heads (GQA), its
    CUDA kernels do not, and no GPU was at hand to measure what splitting would gain there."""
    return getattr(model.config, "_attn_implementation", None) == REPLACES and model.device.type == "cpu"


@contextlib.contextmanager
def cached_attention(model):
    """Run a block with `longctx_cached` attention when `takes_cached_attention` (any other choice is kept)."""
    if not takes_cached_attention(model):
        yield
        return
    current = model.config._attn_implementation
    register_with_transformers()
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(current)
