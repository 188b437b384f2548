"""RoPE scaling methods: pure functions returning (inv_freq, attention_factor), and ROPE_METHODS,
the one table keyed by method name (as transformers' ROPE_INIT_FUNCTIONS). Each entry gives
- `rope_type`: the transformers type its configs carry (ntk and scaling-law only change the base,
  so they write rope_type "default" with a new rope_theta; `ntk_base` and `scaling_law_base` give it);
- `frequencies(params, rotary_dim, max_position_embeddings, seq_len)`: (inv_freq, attention_factor)
  of v5 rope_parameters of that type;
- `options` and `parameters(extension)`: the overrides the planner takes and the rope_parameters it
  writes to extend a model (none for the types longctx reads but does not write: default, longrope);
- the config conventions: whether rope_parameters keep the pre-training length, whether transformers
  reads max_position_embeddings as that length (dynamic), and whether the rotation depends on the
  sequence length (dynamic, longrope: a KV cache built at one length is wrong at another).
Adding a method is one entry: config.py, the planner, `extend`'s options, `plan --help` and the
evaluation engine read what is method-specific from the table.

`inv_freq` holds one inverse frequency per rotated pair of channels (rotary_dim / 2 of them); the
angle of position p in pair i is p * inv_freq[i]. `attention_factor` multiplies cos and sin (so the
attention logits by its square); 1.0 for every method but YaRN and LongRoPE.

The frequency functions are our own code, not a call into transformers (their arithmetic follows
the papers in the order transformers' modeling_rope_utils uses, in float32, so the rounding agrees):
they are the independent reference that tests/test_rope_methods.py holds transformers to. For every
method, the rotary embedding transformers builds from the config we write must give these numbers
to 1e-6. The planner uses their closed forms (ntk_base, scaling_law_base); a loaded model computes
its frequencies with transformers' own code, from the config.

torch is imported inside the functions that build tensors, so that reading the table (the CLI's
--help, the planner) does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from longctx.errors import LongctxError

if TYPE_CHECKING:
    import torch

DEFAULT_BETA_FAST = 32.0
DEFAULT_BETA_SLOW = 1.0
DEFAULT_LOW_FREQ_FACTOR = 1.0
DEFAULT_HIGH_FREQ_FACTOR = 4.0

RopeResult = tuple["torch.Tensor", float]


def _exponents(dim: int) -> torch.Tensor:
    """2i / d for i = 0 .. d/2 - 1, as transformers computes it."""
    import torch

    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Unscaled RoPE: inv_freq[i] = base^(-2i/d)."""
    return 1.0 / (base ** _exponents(dim))


def default_rope(dim: int, base: float) -> RopeResult:
    return default_inv_freq(dim, base), 1.0


def linear_rope(dim: int, base: float, factor: float) -> RopeResult:
    """Position interpolation (PI): every frequency divided by the factor."""
    return default_inv_freq(dim, base) / factor, 1.0


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base: b' = b * s^(d / (d - 2)), so the lowest frequency is interpolated by s
    while the highest is left almost unchanged."""
    return base * factor ** (dim / (dim - 2))


def ntk_rope(dim: int, base: float, factor: float) -> RopeResult:
    return default_rope(dim, ntk_base(base, factor, dim))


def scaling_law_base(base: float, target_len: int, original_len: int) -> float:
    """theta(T) = b^(ln(T / 2pi) / ln(T_orig / 2pi)).

    Keeps the longest wavelength in the same proportion to the context length (in log
    space) as at pre-training; reproduces Gradient's released Llama-3-8B values
    (262144 -> 283461213, 1048576 -> 3580165449 from b = 500000, T_orig = 8192).
    """
    return base ** (math.log(target_len / (2 * math.pi)) / math.log(original_len / (2 * math.pi)))


def dynamic_ntk_base(base: float, factor: float, dim: int, seq_len: int, original_len: int) -> float:
    """Dynamic NTK: the NTK base for the current sequence length (never below the original length)."""
    seq_len = max(seq_len, original_len)
    return base * ((factor * seq_len / original_len) - (factor - 1)) ** (dim / (dim - 2))


def dynamic_ntk_rope(dim: int, base: float, factor: float, original_len: int, seq_len: int | None = None) -> RopeResult:
    """inv_freq at seq_len; at or below original_len it is the unscaled RoPE."""
    seq_len = original_len if seq_len is None else seq_len
    return default_rope(dim, dynamic_ntk_base(base, factor, dim, seq_len, original_len))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """0.1 ln(s) + 1, or the DeepSeek form mscale(s, mscale) / mscale(s, mscale_all_dim) when both are given."""
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    """The (fractional) pair index whose wavelength fits num_rotations times into original_len."""
    return (dim * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(
    dim: int,
    base: float,
    original_len: int,
    beta_fast: float = DEFAULT_BETA_FAST,
    beta_slow: float = DEFAULT_BETA_SLOW,
    truncate: bool = True,
) -> tuple[float, float]:
    """Pairs below `low` keep their frequency (extrapolate), above `high` are divided by the
    factor (interpolate), in between they ramp linearly."""
    low = yarn_correction_dim(beta_fast, dim, base, original_len)
    high = yarn_correction_dim(beta_slow, dim, base, original_len)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_rope(
    dim: int,
    base: float,
    factor: float,
    original_len: int,
    *,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
) -> RopeResult:
    """YaRN ("NTK-by-parts" interpolation plus attention temperature)."""
    import torch

    if attention_factor is None:
        attention_factor = yarn_attention_factor(factor, mscale, mscale_all_dim)
    low, high = yarn_correction_range(
        dim, base, original_len, beta_fast or DEFAULT_BETA_FAST, beta_slow or DEFAULT_BETA_SLOW, truncate
    )
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** _exponents(dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def llama3_rope(
    dim: int,
    base: float,
    factor: float,
    original_len: int,
    *,
    low_freq_factor: float = DEFAULT_LOW_FREQ_FACTOR,
    high_freq_factor: float = DEFAULT_HIGH_FREQ_FACTOR,
) -> RopeResult:
    """Llama 3.1: wavelengths above original_len / low_freq_factor are divided by the factor,
    below original_len / high_freq_factor kept, and smoothly blended in between."""
    import torch

    inv_freq = default_inv_freq(dim, base)
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def longrope_attention_factor(factor: float, original_len: int) -> float:
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_len))


def longrope_rope(
    dim: int,
    base: float,
    short_factor: list[float],
    long_factor: list[float],
    original_len: int,
    *,
    factor: float,
    attention_factor: float | None = None,
    seq_len: int | None = None,
) -> RopeResult:
    """LongRoPE (Phi-3): per-pair rescale factors, the long set beyond original_len."""
    import torch

    if attention_factor is None:
        attention_factor = longrope_attention_factor(factor, original_len)
    factors = long_factor if seq_len and seq_len > original_len else short_factor
    if len(factors) != dim // 2:
        raise ValueError(f"LongRoPE needs {dim // 2} rescale factors for rotary dim {dim}, got {len(factors)}")
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** _exponents(dim))
    return inv_freq, attention_factor


# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extension:
    """What a method's `parameters` function gets: the model's pre-training settings, the target,
    and the user's overrides (only those given, already checked against the method's options)."""

    base: float  # the model's pre-training rope_theta
    native: int  # its pre-training context length
    length: int  # the target length
    factor: float  # the scale: length / native unless given
    rotary_dim: int
    given: dict = field(default_factory=dict)

    @property
    def theta(self) -> float:
        """The theta a scaling method scales: the model's own, or the one given (--rope-theta)."""
        return self.given.get("rope_theta", self.base)


def _default_frequencies(params: dict, rotary_dim: int, max_position_embeddings: int, seq_len: int | None) -> RopeResult:
    return default_rope(rotary_dim, params["rope_theta"])


def _linear_frequencies(params: dict, rotary_dim: int, max_position_embeddings: int, seq_len: int | None) -> RopeResult:
    return linear_rope(rotary_dim, params["rope_theta"], params["factor"])


def _dynamic_frequencies(params: dict, rotary_dim: int, max_position_embeddings: int, seq_len: int | None) -> RopeResult:
    # transformers' dynamic type treats max_position_embeddings as the original length
    return dynamic_ntk_rope(rotary_dim, params["rope_theta"], params["factor"], max_position_embeddings, seq_len)


def _yarn_frequencies(params: dict, rotary_dim: int, max_position_embeddings: int, seq_len: int | None) -> RopeResult:
    original = params["original_max_position_embeddings"]
    return yarn_rope(
        rotary_dim,
        params["rope_theta"],
        params.get("factor") or max_position_embeddings / original,
        original,
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=params.get("truncate", True),
    )


def _llama3_frequencies(params: dict, rotary_dim: int, max_position_embeddings: int, seq_len: int | None) -> RopeResult:
    return llama3_rope(
        rotary_dim,
        params["rope_theta"],
        params["factor"],
        params["original_max_position_embeddings"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
    )


def _longrope_frequencies(params: dict, rotary_dim: int, max_position_embeddings: int, seq_len: int | None) -> RopeResult:
    original = params["original_max_position_embeddings"]
    return longrope_rope(
        rotary_dim,
        params["rope_theta"],
        params["short_factor"],
        params["long_factor"],
        original,
        factor=params.get("factor") or max_position_embeddings / original,
        attention_factor=params.get("attention_factor"),
        seq_len=seq_len,
    )


def _linear_parameters(extension: Extension) -> dict:
    return {"rope_type": "linear", "rope_theta": extension.theta, "factor": extension.factor}


def _ntk_parameters(extension: Extension) -> dict:
    given = extension.given
    if "factor" in given and "rope_theta" in given:
        raise LongctxError("--factor and --rope-theta both set the ntk theta; give one of them")
    theta = given.get("rope_theta", ntk_base(extension.base, extension.factor, extension.rotary_dim))
    return {"rope_type": "default", "rope_theta": theta}


def _scaling_law_parameters(extension: Extension) -> dict:
    # whole numbers, as Gradient published them (283461213, 3580165449)
    theta = extension.given.get("rope_theta", round(scaling_law_base(extension.base, extension.length, extension.native)))
    return {"rope_type": "default", "rope_theta": theta}


def _dynamic_parameters(extension: Extension) -> dict:
    return {"rope_type": "dynamic", "rope_theta": extension.theta, "factor": extension.factor}


YARN_OPTIONS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def _yarn_parameters(extension: Extension) -> dict:
    params = {
        "rope_type": "yarn",
        "rope_theta": extension.theta,
        "factor": extension.factor,
        "original_max_position_embeddings": extension.native,
    }
    params.update({key: extension.given[key] for key in YARN_OPTIONS if key in extension.given})
    return params


def _llama3_parameters(extension: Extension) -> dict:
    low = float(extension.given.get("low_freq_factor", DEFAULT_LOW_FREQ_FACTOR))
    high = float(extension.given.get("high_freq_factor", DEFAULT_HIGH_FREQ_FACTOR))
    if high <= low:
        raise LongctxError(f"--high-freq-factor ({high:g}) must be greater than --low-freq-factor ({low:g})")
    return {
        "rope_type": "llama3",
        "rope_theta": extension.theta,
        "factor": extension.factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": extension.native,
    }


@dataclass(frozen=True)
class RopeMethod:
    """One entry of ROPE_METHODS (see the module docstring)."""

    rope_type: str  # the rope_type of the configs it writes
    frequencies: Callable[[dict, int, int, int | None], RopeResult]  # (params, rotary_dim, max_position_embeddings, seq_len)
    summary: str  # one line for `longctx plan --help`
    options: tuple[str, ...] = ()  # overrides the planner takes (besides the target length)
    parameters: Callable[[Extension], dict] | None = None  # rope_parameters extending a model; None: read only
    keeps_original_length: bool = False  # rope_parameters hold original_max_position_embeddings
    max_position_is_native: bool = False  # transformers reads max_position_embeddings as the pre-training length
    length_dependent: bool = False  # the rotation depends on the sequence length


ROPE_METHODS: dict[str, RopeMethod] = {
    "default": RopeMethod("default", _default_frequencies, "unscaled RoPE"),
    "linear": RopeMethod(
        "linear", _linear_frequencies, "position interpolation: every frequency divided by the factor",
        ("factor", "rope_theta"), _linear_parameters,
    ),
    "ntk": RopeMethod(
        "default", _default_frequencies, "NTK-aware base: theta * s^(d/(d-2)); config stays rope_type default",
        ("factor", "rope_theta"), _ntk_parameters,
    ),
    "scaling-law": RopeMethod(
        "default", _default_frequencies, "theta(T) = theta^(ln(T/2pi)/ln(T0/2pi)) (Gradient's Llama-3 1M values)",
        ("rope_theta",), _scaling_law_parameters,
    ),
    "dynamic": RopeMethod(
        "dynamic", _dynamic_frequencies, "NTK base that grows with the sequence length at inference time",
        ("factor", "rope_theta"), _dynamic_parameters, max_position_is_native=True, length_dependent=True,
    ),
    "yarn": RopeMethod(
        "yarn", _yarn_frequencies, "NTK-by-parts interpolation plus attention temperature",
        ("factor", "rope_theta", *YARN_OPTIONS), _yarn_parameters, keeps_original_length=True,
    ),
    "llama3": RopeMethod(
        "llama3", _llama3_frequencies, "Llama 3.1 piecewise: low frequencies divided, high kept, smooth between",
        ("factor", "rope_theta", "low_freq_factor", "high_freq_factor"), _llama3_parameters, keeps_original_length=True,
    ),
    "longrope": RopeMethod(
        "longrope", _longrope_frequencies, "LongRoPE (Phi-3): per-pair rescale factors, a long set beyond the original length",
        keeps_original_length=True, length_dependent=True,
    ),
}

# transformers' rope types among them (ntk and scaling-law write "default"), and the groups config.py and eval/ use
ROPE_TYPES = tuple(name for name, method in ROPE_METHODS.items() if method.rope_type == name)
TYPES_WITH_ORIGINAL_LENGTH = tuple(name for name in ROPE_TYPES if ROPE_METHODS[name].keeps_original_length)
LENGTH_DEPENDENT_TYPES = tuple(name for name in ROPE_TYPES if ROPE_METHODS[name].length_dependent)


def compute_rope(
    rope_parameters: dict,
    *,
    rotary_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> RopeResult:
    """(inv_freq, attention_factor) for v5 rope_parameters, by the table's function for their rope_type.

    `seq_len` matters only for the length-dependent types (dynamic: the base grows with it;
    longrope: long factors beyond the original length); None means the state right after loading.
    """
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    return ROPE_METHODS[rope_type].frequencies(rope_parameters, rotary_dim, max_position_embeddings, seq_len)
