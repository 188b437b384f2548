"""Parity of our RoPE math with transformers, and the published reference figures.

Each parity test writes a config with our planner + apply_rope_settings, builds
transformers' own rotary embedding from it, and compares inv_freq and the attention
factor with our pure function for the same method, to 1e-6 relative.
"""

import itertools
import math

import pytest
import torch

from longctx.rope.config import apply_rope_settings
from longctx.rope.methods import (
    LENGTH_DEPENDENT_TYPES,
    ROPE_METHODS,
    ROPE_TYPES,
    TYPES_WITH_ORIGINAL_LENGTH,
    compute_rope,
    default_rope,
    dynamic_ntk_rope,
    linear_rope,
    llama3_rope,
    longrope_rope,
    ntk_base,
    ntk_rope,
    scaling_law_base,
    yarn_attention_factor,
    yarn_correction_range,
    yarn_rope,
)
from longctx.rope.planner import METHODS, rope_for_length

HEAD_DIMS = (32, 64, 96, 128, 256)
BASES = (1e4, 1e5, 5e5, 1e6)
FACTORS = (2.0, 4.5, 8.0, 32.0)
ORIGINAL_LENGTHS = (2048, 4096, 8192)
GRID = list(itertools.product(HEAD_DIMS, BASES, FACTORS, ORIGINAL_LENGTHS))


def base_config(head_dim, base, original_len, explicit_head_dim=False):
    """A v4-style Llama config dict: heads of head_dim, 8 heads (or 4 with an explicit larger head_dim)."""
    config = {
        "model_type": "llama",
        "hidden_size": head_dim * 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "vocab_size": 32,
        "max_position_embeddings": original_len,
        "rope_theta": base,
    }
    if explicit_head_dim:  # head_dim that is not hidden_size / heads
        config.update(hidden_size=head_dim * 2, head_dim=head_dim)
    return config


def transformers_rope(config_dict, positions=None):
    """inv_freq and attention_scaling of the rotary embedding transformers builds from config_dict."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(LlamaConfig(**config_dict))
    if positions is not None:  # dynamic and longrope recompute inv_freq in forward
        rotary(torch.zeros(1, dtype=torch.float32), torch.tensor([positions]))
    return rotary.inv_freq, rotary.attention_scaling


def transformers_rope_partial(config_dict):
    """For partial rotary factors: Phi's rotary embedding honours partial_rotary_factor."""
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    rotary = PhiRotaryEmbedding(PhiConfig(**config_dict))
    return rotary.inv_freq, rotary.attention_scaling


def assert_same(ours, theirs):
    inv_ours, factor_ours = ours
    inv_theirs, factor_theirs = theirs
    torch.testing.assert_close(inv_ours, inv_theirs.float(), rtol=1e-6, atol=0)
    assert factor_ours == pytest.approx(factor_theirs, rel=1e-6)


def written_config(config, target, method, **overrides):
    settings = rope_for_length(config, target, method, **overrides)
    return apply_rope_settings(config, settings["rope_parameters"], settings["max_position_embeddings"])


@pytest.mark.parametrize("method", ["linear", "ntk", "scaling-law", "yarn", "llama3"])
def test_static_methods_match_transformers(method):
    for head_dim, base, factor, original in GRID:
        config = base_config(head_dim, base, original)
        target = int(original * factor)
        if method == "linear":
            ours = linear_rope(head_dim, base, factor)
        elif method == "ntk":
            ours = ntk_rope(head_dim, base, factor)
        elif method == "scaling-law":
            ours = default_rope(head_dim, round(scaling_law_base(base, target, original)))
        elif method == "yarn":
            ours = yarn_rope(head_dim, base, factor, original)
        else:
            ours = llama3_rope(head_dim, base, factor, original)
        written = written_config(config, target, method)
        theirs = transformers_rope(written)
        assert_same(ours, theirs)
        # the table's entry for the written type reads the same numbers off the config
        params = written["rope_parameters"]
        assert_same(compute_rope(params, rotary_dim=head_dim, max_position_embeddings=written["max_position_embeddings"]), theirs)


def test_dynamic_matches_transformers_as_sequences_grow_and_reset():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for head_dim, base, factor, original in GRID[::7]:
        config = written_config(base_config(head_dim, base, original), int(original * factor), "dynamic")
        assert config["max_position_embeddings"] == original  # transformers' convention for dynamic
        rotary = LlamaRotaryEmbedding(LlamaConfig(**config))
        # right after loading: unscaled
        assert_same(dynamic_ntk_rope(head_dim, base, factor, original), (rotary.inv_freq, rotary.attention_scaling))
        # transformers only recomputes when the sequence grows, so walk lengths upwards
        for seq_len in (original // 2, original, original + 1, int(original * 1.5), int(original * factor), int(original * factor * 2)):
            rotary(torch.zeros(1), torch.tensor([[seq_len - 1]]))
            assert_same(dynamic_ntk_rope(head_dim, base, factor, original, seq_len), (rotary.inv_freq, rotary.attention_scaling))
        # a short sequence again resets to the unscaled frequencies
        rotary(torch.zeros(1), torch.tensor([[original // 4]]))
        assert_same(dynamic_ntk_rope(head_dim, base, factor, original, original // 4), (rotary.inv_freq, rotary.attention_scaling))


@pytest.mark.parametrize(
    "options",
    [
        {"beta_fast": 16, "beta_slow": 2},
        {"attention_factor": 1.1},
        {"mscale": 0.707, "mscale_all_dim": 0.707},
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"truncate": False},
        {"beta_fast": 64, "beta_slow": 0.5, "truncate": False},
    ],
)
def test_yarn_options_match_transformers(options):
    for head_dim, base, factor, original in GRID[::5]:
        config = written_config(base_config(head_dim, base, original), int(original * factor), "yarn", **options)
        ours = yarn_rope(head_dim, base, factor, original, **options)
        assert_same(ours, transformers_rope(config))
        table = compute_rope(config["rope_parameters"], rotary_dim=head_dim, max_position_embeddings=config["max_position_embeddings"])
        assert_same(table, transformers_rope(config))


@pytest.mark.parametrize("low, high", [(1.0, 4.0), (2.0, 8.0), (0.5, 2.0)])
def test_llama3_frequency_factors_match_transformers(low, high):
    for head_dim, base, factor, original in GRID[::5]:
        config = written_config(
            base_config(head_dim, base, original), int(original * factor), "llama3", low_freq_factor=low, high_freq_factor=high
        )
        ours = llama3_rope(head_dim, base, factor, original, low_freq_factor=low, high_freq_factor=high)
        assert_same(ours, transformers_rope(config))


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3"])
def test_explicit_head_dim_matches_transformers(method):
    for head_dim, base, factor, original in GRID[::11]:
        config = written_config(base_config(head_dim, base, original, explicit_head_dim=True), int(original * factor), method)
        assert config["hidden_size"] // config["num_attention_heads"] != head_dim
        ours = compute_rope(config["rope_parameters"], rotary_dim=head_dim, max_position_embeddings=config["max_position_embeddings"])
        assert_same(ours, transformers_rope(config))


@pytest.mark.parametrize("method", ["ntk", "scaling-law", "linear", "dynamic", "yarn", "llama3"])
@pytest.mark.parametrize("partial", [0.25, 0.5, 0.75])
def test_partial_rotary_factor_matches_transformers(method, partial):
    for head_dim, base, factor, original in GRID[::13]:
        config = base_config(head_dim, base, original)
        config.update(model_type="phi", partial_rotary_factor=partial)  # v4: top-level partial_rotary_factor
        written = written_config(config, int(original * factor), method)
        assert written["rope_parameters"]["partial_rotary_factor"] == partial
        dim = int(head_dim * partial)
        params = written["rope_parameters"]
        ours = compute_rope(params, rotary_dim=dim, max_position_embeddings=written["max_position_embeddings"])
        if method == "ntk":  # the base really is the NTK base for the rotated channels only
            assert params["rope_theta"] == pytest.approx(ntk_base(base, factor, dim), rel=1e-12)
        assert ours[0].shape == (dim // 2,)
        assert_same(ours, transformers_rope_partial(written))


def test_longrope_matches_transformers_short_and_long():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    generator = torch.Generator().manual_seed(0)
    for head_dim, original, target in [(64, 4096, 131072), (96, 4096, 131072), (128, 8192, 65536)]:
        short = (1 + torch.rand(head_dim // 2, generator=generator) * 0.1).tolist()
        long = (1 + torch.rand(head_dim // 2, generator=generator) * 40).tolist()
        params = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": short, "long_factor": long,
                  "original_max_position_embeddings": original}
        config = apply_rope_settings(base_config(head_dim, 1e4, original), params, target)
        rotary = LlamaRotaryEmbedding(LlamaConfig(**config))
        factor = target / original
        assert_same(longrope_rope(head_dim, 1e4, short, long, original, factor=factor), (rotary.inv_freq, rotary.attention_scaling))
        rotary(torch.zeros(1), torch.tensor([[original + 10]]))  # beyond the original length: long factors
        ours_long = longrope_rope(head_dim, 1e4, short, long, original, factor=factor, seq_len=original + 11)
        assert_same(ours_long, (rotary.inv_freq, rotary.attention_scaling))
        assert ours_long[1] == pytest.approx(math.sqrt(1 + math.log(factor) / math.log(original)))


# Reference figures from /work/shared/DESIGN.md


def test_ntk_base_reference_figures():
    assert ntk_base(1e4, 2, 128) == pytest.approx(20221.26, abs=0.005)
    assert ntk_base(5e5, 8, 128) == pytest.approx(4.1342e6, rel=1e-4)


def test_scaling_law_reproduces_gradient_llama3_thetas():
    assert scaling_law_base(500000, 262144, 8192) == pytest.approx(283461213, abs=1)
    assert scaling_law_base(500000, 1048576, 8192) == pytest.approx(3580165449, abs=1)
    assert scaling_law_base(500000, 4194304, 8192) == pytest.approx(45218125210, abs=1)
    assert scaling_law_base(500000, 8192, 8192) == pytest.approx(500000)


def test_llama31_piecewise_reference():
    original = 1.0 / (5e5 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    scaled, attention = llama3_rope(128, 5e5, 8, 8192, low_freq_factor=1, high_freq_factor=4)
    wavelengths = 2 * math.pi / original
    assert attention == 1.0
    assert torch.equal(scaled[:29], original[:29])  # wavelength < 2048: unchanged
    assert bool((wavelengths[:29] < 2048).all()) and bool((wavelengths[35:] > 8192).all())
    torch.testing.assert_close(scaled[35:], original[35:] / 8)  # wavelength > 8192: divided by 8
    middle = scaled[29:35] / original[29:35]
    assert bool(((middle < 1) & (middle > 1 / 8)).all())  # smoothed in between
    assert bool((middle[1:] < middle[:-1]).all())
    assert scaled[63].item() == pytest.approx(3.06893e-7, rel=1e-5)


def test_yarn_reference_figures():
    assert yarn_attention_factor(16) == pytest.approx(1.277259, abs=1e-6)
    assert yarn_attention_factor(1) == 1.0
    assert yarn_correction_range(128, 1e4, 4096, 32, 1, truncate=True) == (20, 46)
    low, high = yarn_correction_range(128, 1e4, 4096, 32, 1, truncate=False)
    assert 20 < low < 21 and 45 < high < 46
    inv_freq, attention = yarn_rope(128, 1e4, 16, 4096)
    unscaled = default_rope(128, 1e4)[0]
    assert torch.equal(inv_freq[:20], unscaled[:20])  # high frequencies extrapolate
    torch.testing.assert_close(inv_freq[46:], unscaled[46:] / 16)  # low frequencies interpolate
    assert attention == pytest.approx(0.1 * math.log(16) + 1)


def test_dynamic_is_unscaled_up_to_the_original_length_and_ntk_beyond():
    unscaled = default_rope(64, 1e4)[0]
    assert torch.equal(dynamic_ntk_rope(64, 1e4, 4, 2048, 1000)[0], unscaled)
    assert torch.equal(dynamic_ntk_rope(64, 1e4, 4, 2048, 2048)[0], unscaled)
    # transformers' formula: scale F * L / L0 - (F - 1); it reaches F at L = L0 (2F - 1) / F ...
    torch.testing.assert_close(dynamic_ntk_rope(64, 1e4, 4, 2048, 3584)[0], ntk_rope(64, 1e4, 4)[0], rtol=1e-6, atol=0)
    # ... and with F = 1 it is the static NTK base for the current length
    torch.testing.assert_close(dynamic_ntk_rope(64, 1e4, 1, 2048, 8192)[0], ntk_rope(64, 1e4, 4)[0], rtol=1e-6, atol=0)


def test_compute_rope_rejects_unknown_type():
    for rope_type in ("axial", "ntk", "scaling-law"):  # planner methods are not rope types: they write "default"
        with pytest.raises(ValueError, match="not supported"):
            compute_rope({"rope_type": rope_type, "rope_theta": 1e4}, rotary_dim=64, max_position_embeddings=128)


# The table's flags, each checked against what the method writes or what transformers does


def test_rope_types_are_the_ones_transformers_knows():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_TYPES) - {"default"} <= set(ROPE_INIT_FUNCTIONS)
    assert {ROPE_METHODS[name].rope_type for name in METHODS} <= set(ROPE_TYPES)


@pytest.mark.parametrize("method", METHODS)
def test_each_entry_writes_its_rope_type_and_length_convention(method):
    entry = ROPE_METHODS[method]
    config = base_config(64, 1e4, 4096)
    settings = rope_for_length(config, 16384, method)
    params = settings["rope_parameters"]
    assert params["rope_type"] == entry.rope_type
    assert ("original_max_position_embeddings" in params) == entry.keeps_original_length
    assert (settings["max_position_embeddings"] == 4096) == entry.max_position_is_native


def longrope_config(head_dim=64, original=4096, target=16384):
    generator = torch.Generator().manual_seed(0)
    params = {
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": original,
        "short_factor": (1 + torch.rand(head_dim // 2, generator=generator) * 0.1).tolist(),
        "long_factor": (1 + torch.rand(head_dim // 2, generator=generator) * 40).tolist(),
    }
    return apply_rope_settings(base_config(head_dim, 1e4, original), params, target)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_length_dependent_types_are_those_transformers_recomputes_for_long_sequences(rope_type):
    """A type is length-dependent when transformers' rotary embedding changes its frequencies
    once a sequence runs past the original length (what makes a reused KV cache wrong)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if rope_type == "longrope":
        config = longrope_config()
    elif rope_type == "default":
        config = base_config(64, 1e4, 4096)
    else:
        config = written_config(base_config(64, 1e4, 4096), 16384, rope_type)
    rotary = LlamaRotaryEmbedding(LlamaConfig(**config))
    before = rotary.inv_freq.clone()
    rotary(torch.zeros(1), torch.tensor([[16383]]))
    assert (not torch.equal(rotary.inv_freq, before)) == (rope_type in LENGTH_DEPENDENT_TYPES)
    assert (rope_type in TYPES_WITH_ORIGINAL_LENGTH) == ("original_max_position_embeddings" in config.get("rope_parameters", {}))
