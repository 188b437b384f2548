"""From a model config and a target length to rope settings, and to a progressive stage schedule.

`rope_for_length` answers "what rope settings extend this model to N tokens with method
M"; `plan` adds the stage schedule for progressive fine-tuning (Gradient, EasyContext):
train at a few growing lengths, each stage starting from the previous one.

Every method is computed from the model's pre-training settings (its rope_theta and
native length). A model that already has rope scaling (Llama 3.1's llama3, a YaRN
model) is re-extended from its pre-training length: the new scaling replaces the old.
"""

from __future__ import annotations

import dataclasses
import math

from longctx.errors import LongctxError
from longctx.rope.config import native_length, rope_settings, rotary_dim
from longctx.rope.methods import ROPE_METHODS, ROPE_TYPES, Extension

# the methods that can extend a model: the table's entries that write rope parameters
METHODS = tuple(name for name, method in ROPE_METHODS.items() if method.parameters is not None)
# every option any of them takes (extend's flags), in table order
OPTIONS = tuple(dict.fromkeys(option for name in METHODS for option in ROPE_METHODS[name].options))

# NTK-aware: the config stays a plain rope_theta that every runtime and merge path reads,
# caches stay valid at every length (unlike dynamic), short prompts keep working (YaRN's
# attention temperature degrades them on small models), and on the default model it
# measured best of the static methods without training (docs/rope.md).
DEFAULT_METHOD = "ntk"

# Stage schedule defaults: EasyContext trains with about 1M tokens per optimizer step,
# 200-400 steps per stage, and a constant learning rate of 2e-5 (as Gradient did).
DEFAULT_TOKENS_PER_STEP = 2**20
DEFAULT_STEPS_PER_STAGE = 200
DEFAULT_LEARNING_RATE = 2e-5
# Walking down from the target, each stage is this many times shorter than the next one:
# the long stages are the expensive ones, so they grow by 2x; early stages jump further.
AUTO_STAGE_RATIOS = (2, 2, 4)
AUTO_STAGE_LAST_RATIO = 8
STAGE_ROUNDING = 1024


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise LongctxError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _positive(value) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def rope_for_length(config: dict, length: int, method: str = DEFAULT_METHOD, **overrides) -> dict:
    """Rope settings {"rope_parameters", "max_position_embeddings"} extending `config` to `length` tokens.

    overrides (None means not given): factor (scale instead of length / native length),
    rope_theta (ntk, scaling-law: the theta to write; other methods: the base theta they
    scale), beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate (yarn),
    low_freq_factor, high_freq_factor (llama3).
    """
    _check_method(method)
    entry = ROPE_METHODS[method]
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(given) - set(OPTIONS)
    if unknown:
        raise TypeError(f"rope_for_length() got unknown parameters {sorted(unknown)}")
    not_for_method = [key for key in given if key not in entry.options]
    if not_for_method:
        flags = ", ".join(_flag(key) for key in not_for_method)
        raise LongctxError(f"{flags} does not apply to method {method}; drop it or choose a method that takes it")
    not_positive = [key for key, value in given.items() if not isinstance(value, bool) and not _positive(value)]
    if not_positive:
        flags = ", ".join(f"{_flag(key)} {given[key]}" for key in not_positive)
        raise LongctxError(f"{flags}: must be a positive number; fix it or drop it for the method's default")
    if length <= 0:
        raise LongctxError(f"target length must be positive, got {length}")

    source = rope_settings(config)
    source_params = source["rope_parameters"]
    if source_params["rope_type"] not in ROPE_TYPES:
        raise LongctxError(
            f"the model uses rope_type {source_params['rope_type']!r}, which longctx cannot rescale; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    native = native_length(source)
    dim = rotary_dim(config, source_params)
    base = float(source_params["rope_theta"])

    factor = float(given.get("factor", length / native))
    if factor < 1:
        raise LongctxError(f"scale factor {factor:g} is below 1 (target {length} < native {native}); longctx only extends")
    # a length-dependent method scales to any length (its factor only sets how fast); the others stop at native * factor
    if "factor" in given and not entry.length_dependent and native * factor < length:
        raise LongctxError(
            f"--factor {factor:g} reaches only {math.floor(native * factor)} tokens from the native {native}, "
            f"less than --target-len {length}; raise --factor or drop it"
        )

    params = entry.parameters(Extension(base=base, native=native, length=length, factor=factor, rotary_dim=dim, given=given))
    params["rope_theta"] = float(params["rope_theta"])
    if "partial_rotary_factor" in source_params:
        params["partial_rotary_factor"] = source_params["partial_rotary_factor"]
    # transformers' dynamic type reads max_position_embeddings as the original length
    max_position_embeddings = native if entry.max_position_is_native else length
    return {"rope_parameters": params, "max_position_embeddings": max_position_embeddings}


@dataclasses.dataclass
class Stage:
    """One fine-tuning stage: train at seq_len with these rope settings."""

    seq_len: int
    rope: dict  # {"rope_parameters": ..., "max_position_embeddings": ...}
    steps: int
    tokens_per_step: int
    tokens: int


@dataclasses.dataclass
class Plan:
    method: str
    native_len: int
    target_len: int
    source: dict  # the model's rope settings as found
    final: dict  # the rope settings at the target length
    stages: list[Stage]
    learning_rate: float

    @property
    def total_tokens(self) -> int:
        return sum(stage.tokens for stage in self.stages)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["total_steps"] = self.total_steps
        data["total_tokens"] = self.total_tokens
        return data


def _round_stage(length: int) -> int:
    return length // STAGE_ROUNDING * STAGE_ROUNDING if length >= STAGE_ROUNDING else length


def auto_stage_lengths(native: int, target: int) -> list[int]:
    """Gradient-like ladder: walk down from the target by 2, 2, 4, then 8 each time, while a
    stage is still at least twice the native length (8K -> 1M: 65K, 262K, 524K, 1048K)."""
    lengths = [target]
    for step in range(64):
        ratio = AUTO_STAGE_RATIOS[step] if step < len(AUTO_STAGE_RATIOS) else AUTO_STAGE_LAST_RATIO
        shorter = _round_stage(lengths[-1] // ratio)
        if shorter < 2 * native:
            break
        lengths.append(shorter)
    return lengths[::-1]


def geometric_stage_lengths(native: int, target: int, count: int) -> list[int]:
    """`count` stages growing by the same ratio from the native length to the target."""
    if count < 1:
        raise LongctxError(f"--stages must be at least 1, got {count}")
    ratio = (target / native) ** (1 / count)
    lengths = [_round_stage(round(native * ratio**i)) for i in range(1, count)] + [target]
    previous = native
    for length in lengths:
        if length <= previous:
            raise LongctxError(
                f"{count} stages from {native} to {target} tokens would repeat a length; use fewer stages or --stages auto"
            )
        previous = length
    return lengths


def plan(
    config: dict,
    target_len: int,
    method: str = DEFAULT_METHOD,
    stages: str | int = "auto",
    *,
    steps_per_stage: int = DEFAULT_STEPS_PER_STAGE,
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    **overrides,
) -> Plan:
    """The rope settings for target_len and a progressive schedule of stages reaching it.

    Each stage's rope settings come from the base model's settings directly (not from the
    previous stage), as in Gradient's Llama-3 schedule. overrides go to rope_for_length for
    every stage (e.g. beta_fast); factor and rope_theta are per-length and not accepted.
    """
    _check_method(method)
    fixed = [key for key in ("factor", "rope_theta") if overrides.get(key) is not None]
    if fixed:
        raise LongctxError(f"plan derives {' and '.join(fixed)} for each stage; use `longctx extend` to set them")
    if steps_per_stage < 1 or tokens_per_step < 1:
        raise LongctxError("steps per stage and tokens per step must be at least 1")
    source = rope_settings(config)
    native = native_length(source)
    if target_len <= native:
        raise LongctxError(f"target length {target_len} is not beyond the native length {native}; nothing to plan")
    if stages == "auto":
        lengths = auto_stage_lengths(native, target_len)
    else:
        try:
            count = int(stages)
        except (TypeError, ValueError):
            raise LongctxError(f"--stages must be 'auto' or a whole number, got {stages!r}") from None
        lengths = geometric_stage_lengths(native, target_len, count)

    schedule = []
    for length in lengths:
        sequences_per_step = max(1, round(tokens_per_step / length))
        step_tokens = sequences_per_step * length
        schedule.append(
            Stage(
                seq_len=length,
                rope=rope_for_length(config, length, method, **overrides),
                steps=steps_per_stage,
                tokens_per_step=step_tokens,
                tokens=steps_per_stage * step_tokens,
            )
        )
    return Plan(
        method=method,
        native_len=native,
        target_len=target_len,
        source=source,
        final=schedule[-1].rope,
        stages=schedule,
        learning_rate=learning_rate,
    )


def describe_rope(settings: dict) -> str:
    """One short line for a human: 'yarn x4 from 8192, theta 500000', 'theta 3580165449'."""
    params = settings["rope_parameters"]
    rope_type = params["rope_type"]
    theta = f"theta {params['rope_theta']:.10g}"
    if rope_type == "default":
        return theta
    text = f"{rope_type} x{params.get('factor', 0):g}"
    if "original_max_position_embeddings" in params:
        text += f" from {params['original_max_position_embeddings']}"
    elif rope_type == "dynamic":
        text += f" from {settings['max_position_embeddings']}"
    return f"{text}, {theta}"
