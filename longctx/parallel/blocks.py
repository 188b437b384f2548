"""Attention on one (query block, key/value block) pair, returning the log-sum-exp the ring merges with.

Layout [batch, heads, seq, head_dim]; k and v may have fewer heads than q (GQA: query head i uses
key/value head i // (heads / kv_heads)), never repeated in memory. `allowed` is an optional boolean
mask [batch, 1, q_seq, k_seq] (True = attend) that already includes causality when it is given; a
query row with nothing allowed gets output 0 and lse -inf, which the merge treats as "no
contribution". The backward takes the FINAL output and lse of the whole ring (not this block's):
with those, exp(scores - lse) is the true attention probability, and the block's gradients add up
to the exact full-attention gradients (the flash-attention backward identity).

Two kernels:
- `cpu-flash`: PyTorch's CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`
  and its backward), which returns lse, handles GQA natively and never materializes the scores.
- `math`: explicit scores in float32, any device; memory O(q_seq x k_seq) per block.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def block_forward(kernel: str, q, k, v, scale: float, causal: bool, allowed: torch.Tensor | None):
    """(out [b, h, sq, d] in q.dtype or float32, lse [b, h, sq] float32) for one block."""
    if kernel == "cpu-flash":
        return _cpu_flash_forward(q, k, v, scale, causal, allowed)
    return _math_forward(q, k, v, scale, causal, allowed)


def block_backward(kernel: str, dout, q, k, v, out, lse, scale: float, causal: bool, allowed: torch.Tensor | None):
    """(dq, dk, dv) of one block, given the final out/lse rows for these queries."""
    if kernel == "cpu-flash":
        return _cpu_flash_backward(dout, q, k, v, out, lse, scale, causal, allowed)
    return _math_backward(dout, q, k, v, out, lse, scale, causal, allowed)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, NEG_INF)


def _cpu_flash_forward(q, k, v, scale, causal, allowed):
    attn_mask = None if allowed is None else _additive_mask(allowed, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal and allowed is None, attn_mask=attn_mask, scale=scale
    )
    if allowed is not None:
        # the kernel reports lse 0 (not -inf) for a row with every key masked
        lse = lse.masked_fill(~allowed.any(dim=-1), NEG_INF)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, scale, causal, allowed):
    attn_mask = None if allowed is None else _additive_mask(allowed, q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0,
        causal and allowed is None, attn_mask=attn_mask, scale=scale,
    )


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, h, s, d] -> float32 [b, kv_heads, h // kv_heads, s, d] (a view when x is float32)."""
    b, h, s, d = x.shape
    return x.float().reshape(b, kv_heads, h // kv_heads, s, d)


def _allowed_grouped(q_len: int, k_len: int, causal: bool, allowed, device) -> torch.Tensor | None:
    """The block's mask as [b or 1, 1, 1, sq, sk] (broadcast over kv heads and groups), or None."""
    if allowed is not None:
        return allowed[:, :, None]
    if causal:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril_()[None, None, None]
    return None


def _math_scores(q, k, scale, causal, allowed):
    kv_heads = k.shape[1]
    scores = torch.einsum("bkgqd,bksd->bkgqs", _grouped(q, kv_heads), k.float()) * scale
    mask = _allowed_grouped(q.shape[2], k.shape[2], causal, allowed, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF)
    return scores


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(lse)[..., None]
    return torch.where(finite, torch.exp(scores - torch.where(finite, lse[..., None], 0.0)), 0.0)


def _math_forward(q, k, v, scale, causal, allowed):
    b, h, sq, d = q.shape
    scores = _math_scores(q, k, scale, causal, allowed)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bkgqs,bksd->bkgqd", _probabilities(scores, lse), v.float())
    return out.reshape(b, h, sq, v.shape[-1]), lse.reshape(b, h, sq)


def _math_backward(dout, q, k, v, out, lse, scale, causal, allowed):
    b, h, sq, d = q.shape
    kv_heads = k.shape[1]
    scores = _math_scores(q, k, scale, causal, allowed)
    p = _probabilities(scores, lse.reshape(b, kv_heads, h // kv_heads, sq))
    dout_g = _grouped(dout, kv_heads)
    dv = torch.einsum("bkgqs,bkgqd->bksd", p, dout_g)
    dp = torch.einsum("bkgqd,bksd->bkgqs", dout_g, v.float())
    delta = (dout_g * _grouped(out, kv_heads)).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bkgqs,bksd->bkgqd", ds, k.float()).reshape(b, h, sq, d)
    dk = torch.einsum("bkgqs,bkgqd->bksd", ds, _grouped(q, kv_heads))
    return dq, dk, dv
