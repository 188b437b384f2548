"""RoPE scaling methods: one pure function per method, each returning (inv_freq, attention_factor).

`inv_freq` holds one inverse frequency per rotated pair of channels (rotary_dim / 2 of
them); the angle of position p in pair i is p * inv_freq[i]. `attention_factor` multiplies
cos and sin (so the attention logits by its square); 1.0 for every method but YaRN and LongRoPE.

The arithmetic follows transformers' modeling_rope_utils step for step, in float32, so
the numbers agree with what a transformers model builds from the config we write (the
parity tests check this for every method). Methods that only change the base
(NTK-aware, scaling-law) are written to configs as rope_type "default" with a new
rope_theta; `ntk_base` and `scaling_law_base` give that theta.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BETA_FAST = 32.0
DEFAULT_BETA_SLOW = 1.0
DEFAULT_LOW_FREQ_FACTOR = 1.0
DEFAULT_HIGH_FREQ_FACTOR = 4.0

RopeResult = tuple[torch.Tensor, float]


def _exponents(dim: int) -> torch.Tensor:
    """2i / d for i = 0 .. d/2 - 1, as transformers computes it."""
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
    if attention_factor is None:
        attention_factor = longrope_attention_factor(factor, original_len)
    factors = long_factor if seq_len and seq_len > original_len else short_factor
    if len(factors) != dim // 2:
        raise ValueError(f"LongRoPE needs {dim // 2} rescale factors for rotary dim {dim}, got {len(factors)}")
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** _exponents(dim))
    return inv_freq, attention_factor


def compute_rope(
    rope_parameters: dict,
    *,
    rotary_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> RopeResult:
    """(inv_freq, attention_factor) for v5 rope_parameters, as transformers computes them.

    `seq_len` matters only for dynamic (the base grows with it) and longrope (long
    factors beyond the original length); None means the state right after loading.
    """
    params = rope_parameters
    rope_type = params.get("rope_type", "default")
    base = params["rope_theta"]
    if rope_type == "default":
        return default_rope(rotary_dim, base)
    if rope_type == "linear":
        return linear_rope(rotary_dim, base, params["factor"])
    if rope_type == "dynamic":
        # transformers' dynamic type treats max_position_embeddings as the original length
        return dynamic_ntk_rope(rotary_dim, base, params["factor"], max_position_embeddings, seq_len)
    if rope_type == "yarn":
        original = params["original_max_position_embeddings"]
        factor = params.get("factor") or max_position_embeddings / original
        return yarn_rope(
            rotary_dim,
            base,
            factor,
            original,
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=params.get("truncate", True),
        )
    if rope_type == "llama3":
        return llama3_rope(
            rotary_dim,
            base,
            params["factor"],
            params["original_max_position_embeddings"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
        )
    if rope_type == "longrope":
        original = params["original_max_position_embeddings"]
        return longrope_rope(
            rotary_dim,
            base,
            params["short_factor"],
            params["long_factor"],
            original,
            factor=params.get("factor") or max_position_embeddings / original,
            attention_factor=params.get("attention_factor"),
            seq_len=seq_len,
        )
    raise ValueError(f"rope_type {rope_type!r} is not supported")
