"""RoPE scaling: the math of each method, config read/write, and the length planner."""

from longctx.rope.config import apply_rope_settings, rope_frequencies, rope_settings
from longctx.rope.planner import DEFAULT_METHOD, METHODS, Plan, Stage, plan, rope_for_length

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Plan",
    "Stage",
    "apply_rope_settings",
    "plan",
    "rope_for_length",
    "rope_frequencies",
    "rope_settings",
]
