"""RoPE scaling, pure: the math of each method, config read/write (as dicts), and the length planner.

- `methods.py`: one pure function per method -> (inv_freq, attention_factor), and ROPE_METHODS, the
  one table keyed by method name (frequencies, options, the parameters it writes, its conventions);
- `config.py`: v5 `rope_parameters` and v4 `rope_scaling` read from a config dict, v5 written back;
- `planner.py`: the rope settings for a target length, and a progressive stage schedule.

Touches no file and imports no torch at import time (the CLI's --help reads the table).
Imports: longctx.errors and longctx.units only; models/extend.py writes what the planner decides.
"""

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
