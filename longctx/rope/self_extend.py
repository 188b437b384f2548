"""Self-Extend's group size and neighbour window for a target length.

Grouped-position attention (attention/self_extend.py) keeps exact positions inside a window of
W tokens and divides positions by G beyond it, so the largest relative position a model of
native length L sees at N tokens stays within L when (L - W) * G + W >= N (Jin et al. 2024).
Given W, the planner takes the smallest G that satisfies it: the coarser the groups, the more
a position blurs. The default window is an eighth of the native length: 1024 for an 8K model,
the window LongLM runs Llama-2 with.
"""

from __future__ import annotations

import math

from longctx.errors import LongctxError

SELF_EXTEND = "self-extend"  # the method name extend takes
CONFIG_KEY = "self_extend"  # the config.json entry {"group_size": G, "window": W} that longctx_self_extend reads
WINDOW_FRACTION = 8


def reach(native: int, group_size: int, window: int) -> int:
    """The longest sequence whose grouped relative positions stay within the native length."""
    return (native - window) * group_size + window


def self_extend_for_length(native: int, target: int, *, group_size: int | None = None, window: int | None = None) -> dict:
    """{"group_size": G, "window": W} that reaches `target` tokens from a model of `native` tokens."""
    if window is None:
        window = max(1, native // WINDOW_FRACTION)
    if not 0 < window < native:
        raise LongctxError(f"--window {window} must be between 1 and the native length {native} - 1")
    if group_size is None:
        group_size = max(1, math.ceil((target - window) / (native - window)))
    if group_size < 1:
        raise LongctxError(f"--group-size {group_size} must be at least 1")
    if reach(native, group_size, window) < target:
        raise LongctxError(
            f"--group-size {group_size} with --window {window} reaches only {reach(native, group_size, window)} tokens "
            f"from the native {native}, less than --target-len {target}; raise --group-size or drop it"
        )
    return {"group_size": group_size, "window": window}
