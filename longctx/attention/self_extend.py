"""Grouped-position attention (Self-Extend; Jin et al. 2024, "LLM Maybe LongLM").

A query at position i attends to a key at position j <= i with the key's exact relative
position while i - j < W (the neighbour window), and beyond it with grouped positions: the
query as if at i // G + W - W // G, the key at j // G. Distances the model never saw in
pre-training are folded back into its range: a model of native length L reaches about
(L - W) * G + W tokens. The offset W - W // G makes the grouped distance continue the exact
one at the window's edge. (LongLM's own prefill code writes W - W / G, a float, while its
decode path writes W - W // G; this module uses W - W // G everywhere, so a prompt prefilled
in chunks, or decoded token by token, sees the same positions as one pass.)

Queries and keys arrive already rotated at their exact positions (as transformers and a KV
cache hold them). A rotation composes, R(p + d) = R(d) R(p), so the grouped ones are the
exact ones rotated on by the difference of positions: no unrotated copy is needed.

The keys of a chunk of queries at positions [a, b) (b = the number of keys) fall in two
ranges: keys before a - W + 1 are beyond the window for every query (grouped, no mask), and
the rest are near (both kinds, split by a [q, q + W - 1] band mask). Each part is one
`block_forward` with its log-sum-exp; the parts merge by log-sum-exp, out of place. Under autograd every
part runs on the `math` kernel (scores in memory, O(q x k) per part): the fused kernels return no
gradient through their log-sum-exp.
"""

from __future__ import annotations

import torch

from longctx.attention.blocks import block_forward, choose_kernel


def grouped_query_positions(positions: torch.Tensor, group_size: int, window: int) -> torch.Tensor:
    return positions // group_size + (window - window // group_size)


def grouped_key_positions(positions: torch.Tensor, group_size: int) -> torch.Tensor:
    return positions // group_size


def rotate_by(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, d] (rotary half-split layout, as transformers' rotate_half) rotated on by `shift`
    [s] positions; the first 2 * len(inv_freq) dims rotate, the rest (partial rotary) pass."""
    rotary = 2 * inv_freq.numel()
    angles = shift.to(torch.float32)[:, None] * inv_freq.to(device=x.device, dtype=torch.float32)[None, :]
    cos, sin = torch.cat((angles, angles), dim=-1).cos(), torch.cat((angles, angles), dim=-1).sin()
    part = x[..., :rotary].float()
    half = rotary // 2
    rotated_half = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    rotated = (part * cos + rotated_half * sin).to(x.dtype)
    return rotated if rotary == x.shape[-1] else torch.cat((rotated, x[..., rotary:]), dim=-1)


def self_extend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    inv_freq: torch.Tensor, group_size: int, window: int, scale: float,
) -> torch.Tensor:
    """Causal grouped-position attention of the last query.shape[2] positions of a sequence whose
    keys and values (positions 0 .. key.shape[2] - 1) are key, value; [batch, heads, seq, head_dim],
    GQA allowed. Returns [batch, heads, q_seq, head_dim] in query's dtype."""
    q_len, k_len = query.shape[2], key.shape[2]
    start = k_len - q_len  # position of the first query
    # the fused kernels give no gradient through their lse, which the merge needs: under autograd, math
    kernel = choose_kernel(query, math_only=torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
    grouping = k_len > window and group_size > 1
    if not grouping and (q_len == 1 or start == 0):  # every distance inside the window: plain causal attention
        return block_forward(kernel, query, key, value, scale, start == 0, None)[0].to(query.dtype)
    device = query.device
    query_positions = torch.arange(start, k_len, device=device)
    query_shift = grouped_query_positions(query_positions, group_size, window) - query_positions
    grouped_query = rotate_by(query, query_shift, inv_freq)

    parts = []
    far = max(0, start - window + 1)  # keys [0, far) are beyond the window for every query
    if far:
        key_positions = torch.arange(far, device=device)
        grouped_key = rotate_by(key[:, :, :far], grouped_key_positions(key_positions, group_size) - key_positions, inv_freq)
        parts.append(block_forward(kernel, grouped_query, grouped_key, value[:, :, :far], scale, False, None))
    near_positions = torch.arange(far, k_len, device=device)
    distance = query_positions[:, None] - near_positions[None, :]
    inside = ((distance >= 0) & (distance < window))[None, None]
    beyond = (distance >= window)[None, None]
    near_key, near_value = key[:, :, far:], value[:, :, far:]
    parts.append(block_forward(kernel, query, near_key, near_value, scale, False, inside.expand(query.shape[0], 1, -1, -1)))
    if bool(beyond.any()):
        grouped_near_key = rotate_by(near_key, grouped_key_positions(near_positions, group_size) - near_positions, inv_freq)
        parts.append(block_forward(kernel, grouped_query, grouped_near_key, near_value, scale, False,
                                   beyond.expand(query.shape[0], 1, -1, -1)))
    return merge_parts(parts).to(query.dtype)


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The softmax-weighted union of (out, lse) parts over disjoint key sets; every query row has
    a key in at least one part (its own position), so the total lse is finite."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(0.0)
    return sum(out.float() * weight[..., None] for (out, _), weight in zip(parts, weights))
