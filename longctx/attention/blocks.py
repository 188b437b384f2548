"""Attention on one (query block, key/value block) pair, returning the log-sum-exp the ring merges with.

Layout [batch, heads, seq, head_dim]; k and v may have fewer heads than q (GQA: query head i uses
key/value head i // (heads / kv_heads)), never repeated in memory. `allowed` is an optional boolean
mask [batch, 1, q_seq, k_seq] (True = attend) that already includes causality when it is given; a
query row with nothing allowed gets output 0 and lse -inf, which the merge treats as "no
contribution". The backward takes the FINAL output and lse of the whole ring (not this block's):
with those, exp(scores - lse) is the true attention probability, and the block's gradients add up
to the exact full-attention gradients (the flash-attention backward identity).

Kernels (PyTorch's own; `choose_kernel` picks one for a device and dtype):
- `cpu-flash`: PyTorch's CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`
  and its backward), which returns lse, handles GQA natively and never materializes the scores.
- `cuda-flash`: `_scaled_dot_product_flash_attention` and its backward (float16/bfloat16, head_dim
  a multiple of 8 up to 256); lse [b, h, sq].
- `cuda-efficient`: `_scaled_dot_product_efficient_attention` and its backward (any float dtype);
  its lse comes padded to a multiple of 32 query rows, so it is cut on the way out and padded
  again for the backward.
- `math`: explicit scores in float32, any device; memory O(q_seq x k_seq) per block.
The CUDA kernels take no document mask here: a block with one (`allowed` given) runs on `math`.
They are checked against `math` on a small problem the first time they are chosen for a (device,
dtype, head_dim); a kernel that fails or disagrees is replaced by `math`, with a warning.
"""

from __future__ import annotations

import warnings

import torch

NEG_INF = float("-inf")

_CUDA_KERNELS = ("cuda-flash", "cuda-efficient")
_LSE_ROW_ALIGNMENT = 32  # the efficient kernel's lse has its query rows padded to this


def block_forward(kernel: str, q, k, v, scale: float, causal: bool, allowed: torch.Tensor | None):
    """(out [b, h, sq, d] in q.dtype or float32, lse [b, h, sq] float32) for one block."""
    if kernel == "cpu-flash":
        return _cpu_flash_forward(q, k, v, scale, causal, allowed)
    if kernel == "cuda-flash" and allowed is None:
        return _cuda_flash_forward(q, k, v, scale, causal)
    if kernel == "cuda-efficient" and allowed is None:
        return _cuda_efficient_forward(q, k, v, scale, causal)
    return _math_forward(q, k, v, scale, causal, allowed)


def block_backward(kernel: str, dout, q, k, v, out, lse, scale: float, causal: bool, allowed: torch.Tensor | None):
    """(dq, dk, dv) of one block, given the final out/lse rows for these queries."""
    if kernel == "cpu-flash":
        return _cpu_flash_backward(dout, q, k, v, out, lse, scale, causal, allowed)
    if kernel == "cuda-flash" and allowed is None:
        return _cuda_flash_backward(dout, q, k, v, out, lse, scale, causal)
    if kernel == "cuda-efficient" and allowed is None:
        return _cuda_efficient_backward(dout, q, k, v, out, lse, scale, causal)
    return _math_backward(dout, q, k, v, out, lse, scale, causal, allowed)


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """out, lse (float32 views) <- the softmax-weighted union of (out, lse) and the block's result.

    out = out - sigmoid(lse_b - lse) (out - out_b); lse = lse - logsigmoid(lse - lse_b); rows where
    either side is empty (lse -inf) take the other side (exactly: out starts at 0, lse at -inf).
    """
    weight = torch.sigmoid(block_lse - lse).nan_to_num_(0.0).unsqueeze(-1)
    correction = torch.sub(out, block_out).mul_(weight)
    out.sub_(correction)
    del correction
    merged = lse - torch.nn.functional.logsigmoid(lse - block_lse)
    lse.copy_(torch.where(torch.isneginf(lse), block_lse, merged))


def preferred_kernel(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel for a device type and dtype, before any check: a kernel that returns lse, else math."""
    if device_type == "cpu":
        return "cpu-flash"
    if device_type == "cuda" and head_dim % 8 == 0:
        if dtype in (torch.float16, torch.bfloat16) and head_dim <= 256:
            return "cuda-flash"
        return "cuda-efficient"
    return "math"


_checked_kernels: dict[tuple, str] = {}


def choose_kernel(q: torch.Tensor, math_only: bool = False) -> str:
    """The kernel for blocks of q's device and dtype; a CUDA kernel only once it has matched `math` there."""
    if math_only:
        return "math"
    kernel = preferred_kernel(q.device.type, q.dtype, q.shape[-1])
    if kernel not in _CUDA_KERNELS:
        return kernel
    key = (kernel, str(q.device), q.dtype, q.shape[-1])
    if key not in _checked_kernels:
        _checked_kernels[key] = kernel if kernel_matches_math(kernel, q.device, q.dtype, q.shape[-1]) else "math"
    return _checked_kernels[key]


def kernel_matches_math(kernel: str, device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `kernel` gives math's output, lse and gradients on small random blocks (causal, and not, with
    a query count that is not a multiple of 32); warns and returns False when it differs or fails."""
    generator = torch.Generator().manual_seed(0)
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-3)
    try:
        for q_len, k_len, causal in ((50, 50, True), (50, 96, False)):
            q, dout = (torch.randn(2, 1, q_len, head_dim, generator=generator).to(device, dtype) for _ in range(2))
            k, v = (torch.randn(2, 1, k_len, head_dim, generator=generator).to(device, dtype) for _ in range(2))
            scale = head_dim ** -0.5
            out, lse = block_forward(kernel, q, k, v, scale, causal, None)
            expected_out, expected_lse = _math_forward(q, k, v, scale, causal, None)
            final_out = expected_out.to(dtype)  # both backwards from the same final output and lse
            grads = block_backward(kernel, dout, q, k, v, final_out, expected_lse, scale, causal, None)
            expected_grads = _math_backward(dout, q, k, v, final_out, expected_lse, scale, causal, None)
            pairs = [(out, expected_out), (lse, expected_lse), *zip(grads, expected_grads)]
            worst = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
            if not worst <= tolerance * max(1.0, max(float(b.float().abs().max()) for _, b in pairs)):
                raise ValueError(f"differs from the math kernel by {worst:.3g}")
    except (RuntimeError, AttributeError, ValueError) as error:
        # RuntimeError (NotImplementedError among them): an op this device or dtype cannot run, or whose schema
        # we misread; AttributeError: an op this PyTorch build lacks; ValueError: it ran and disagrees (above).
        # Anything else (a TypeError, say) is a bug in this module and propagates.
        warnings.warn(f"ring attention: kernel {kernel} on {device} {dtype} head_dim {head_dim} is not usable "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); using the math kernel",
                      stacklevel=3)
        return False
    return True


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


def _cuda_flash_forward(q, k, v, scale, causal):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _cuda_flash_backward(dout, q, k, v, out, lse, scale, causal):
    # no dropout: the random-number state is not read, but the op takes one
    philox_seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    philox_offset = torch.empty((), dtype=torch.uint64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal,
        philox_seed, philox_offset, scale=scale,
    )


def _cuda_efficient_forward(q, k, v, scale, causal):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]


def _cuda_efficient_backward(dout, q, k, v, out, lse, scale, causal):
    q_len = q.shape[2]
    padded_lse = lse.new_zeros(*lse.shape[:-1], -(-q_len // _LSE_ROW_ALIGNMENT) * _LSE_ROW_ALIGNMENT)
    padded_lse[..., :q_len] = lse
    no_rng = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, padded_lse, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv


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
