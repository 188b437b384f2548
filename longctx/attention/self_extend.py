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

The keys of a chunk of queries at positions [a, b) (b = the number of keys) fall in three
parts: keys before a - W + 1 are beyond the window for every query (grouped, no mask); keys
from a - W + 1 on are attended at exact positions where they are inside a query's window (a
band mask); keys from a - W + 1 to b - W also at grouped positions where they are beyond it
(the band's complement). Each part is one
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


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, d] (rotary half-split layout, as transformers' rotate_half) rotated by the angles whose
    cos/sin [s, rotary / 2] are given; dims beyond `rotary` (partial rotary) pass unchanged. Written
    into one new tensor without temporaries: over a long cache this is memory-bound."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    if torch.is_grad_enabled() and x.requires_grad:  # out= ops do not record gradients
        rotated = (x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half :])
        return torch.cat(rotated, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]
    return out


class GroupedRotation:
    """cos/sin of the shifts from exact to grouped positions, for queries and keys at positions
    [0, n), in x's dtype; computed once and grown by doubling (a decode step would otherwise pay
    for a transcendental per cached key and dimension)."""

    def __init__(self, inv_freq: torch.Tensor, group_size: int, window: int):
        self.inv_freq, self.group_size, self.window = inv_freq.float(), group_size, window
        self.length = 0
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _grow(self, length: int, like: torch.Tensor) -> None:
        self.length = max(length, 2 * self.length)
        positions = torch.arange(self.length, device=like.device)
        shifts = {
            "query": grouped_query_positions(positions, self.group_size, self.window) - positions,
            "key": grouped_key_positions(positions, self.group_size) - positions,
        }
        inv_freq = self.inv_freq.to(like.device)
        for name, shift in shifts.items():
            angles = shift.float()[:, None] * inv_freq[None, :]
            self.tables[name] = (angles.cos().to(like.dtype), angles.sin().to(like.dtype))

    def rotate(self, x: torch.Tensor, kind: str, start: int) -> torch.Tensor:
        """x [b, h, s, d] at positions start .. start + s - 1, moved to their grouped positions."""
        end = start + x.shape[2]
        cos, sin = self.tables.get(kind, (None, None))
        if end > self.length or cos is None or cos.dtype != x.dtype or cos.device != x.device:
            self._grow(end, x)
            cos, sin = self.tables[kind]
        return rotate_by(x, cos[start:end], sin[start:end])


def self_extend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, rotation: GroupedRotation, scale: float,
) -> torch.Tensor:
    """Causal grouped-position attention of the last query.shape[2] positions of a sequence whose
    keys and values (positions 0 .. key.shape[2] - 1) are key, value; [batch, heads, seq, head_dim],
    GQA allowed. Returns [batch, heads, q_seq, head_dim] in query's dtype. `rotation` carries the
    model's inv_freq, G and W, and keeps its tables between calls."""
    group_size, window = rotation.group_size, rotation.window
    q_len, k_len = query.shape[2], key.shape[2]
    start = k_len - q_len  # position of the first query
    # the fused kernels give no gradient through their lse, which the merge needs: under autograd, math
    kernel = choose_kernel(query, math_only=torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
    grouping = k_len > window and group_size > 1
    if not grouping and (q_len == 1 or start == 0):  # every distance inside the window: plain causal attention
        return block_forward(kernel, query, key, value, scale, start == 0, None)[0].to(query.dtype)
    batch, device = query.shape[0], query.device
    grouped_query = rotation.rotate(query, "query", start)

    parts = []
    near = max(0, start - window + 1)  # keys before `near` are beyond the window for every query: grouped, no mask
    if near:
        grouped_far = rotation.rotate(key[:, :, :near], "key", 0)
        parts.append(block_forward(kernel, grouped_query, grouped_far, value[:, :, :near], scale, False, None))
    query_positions = torch.arange(start, k_len, device=device)[:, None]
    # exact positions for keys [near, k_len) within the window (and causal)
    distance = query_positions - torch.arange(near, k_len, device=device)[None, :]
    inside = (distance >= 0) & (distance < window)
    mask = None if bool(inside.all()) else inside[None, None].expand(batch, 1, -1, -1)
    parts.append(block_forward(kernel, query, key[:, :, near:], value[:, :, near:], scale, False, mask))
    # grouped positions for keys [near, k_len - window): some query is a window or more past them
    grouped_end = k_len - window
    if grouped_end > near:
        beyond = (distance[:, : grouped_end - near] >= window)[None, None].expand(batch, 1, -1, -1)
        grouped_near = rotation.rotate(key[:, :, near:grouped_end], "key", near)
        parts.append(block_forward(kernel, grouped_query, grouped_near, value[:, :, near:grouped_end], scale, False, beyond))
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
