"""Reading v4 and v5 rope settings from config.json dicts and writing v5 ones."""

import json

import pytest
import torch

from longctx.errors import LongctxError
from longctx.rope.config import (
    apply_rope_settings,
    context_length,
    head_dim,
    native_length,
    rope_frequencies,
    rope_settings,
    rope_types,
    rotary_dim,
)

LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "vocab_size": 32,
}


def v4(**fields):
    return {**LLAMA, **fields}


def test_reads_v4_default():
    settings = rope_settings(v4(rope_theta=500000.0, max_position_embeddings=8192))
    assert settings == {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "max_position_embeddings": 8192}


def test_reads_v4_rope_scaling_with_old_type_key():
    config = v4(rope_theta=1e4, max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_settings(config)["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}


def test_reads_v4_llama31_and_fills_original_length():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    settings = rope_settings(v4(rope_theta=5e5, max_position_embeddings=131072, rope_scaling=scaling))
    assert settings["rope_parameters"] == {**scaling, "rope_theta": 5e5}
    assert native_length(settings) == 8192 and context_length(settings) == 131072
    # a yarn dict without original_max_position_embeddings: transformers takes max_position_embeddings
    settings = rope_settings(v4(rope_theta=1e4, max_position_embeddings=4096, rope_scaling={"type": "yarn", "factor": 4.0}))
    assert settings["rope_parameters"]["original_max_position_embeddings"] == 4096


def test_reads_v4_without_theta_uses_transformers_default():
    settings = rope_settings(v4(max_position_embeddings=2048, rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert settings["rope_parameters"]["rope_theta"] == 10000.0
    assert native_length(settings) == 2048 and context_length(settings) == 4096


def test_reads_v5_and_prefers_it_over_stray_v4_keys():
    params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    settings = rope_settings(v4(rope_parameters=params, rope_theta=1.0, max_position_embeddings=131072))
    assert settings["rope_parameters"] == params
    assert native_length(settings) == 32768


def test_phi3_top_level_original_length_wins_as_in_transformers():
    params = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
              "original_max_position_embeddings": 2048}
    config = v4(rope_scaling=params, original_max_position_embeddings=4096, max_position_embeddings=131072)
    assert rope_settings(config)["rope_parameters"]["original_max_position_embeddings"] == 4096
    written = apply_rope_settings(config, {**params, "original_max_position_embeddings": 8192}, 131072)
    assert written["original_max_position_embeddings"] == 8192  # kept consistent, not left to override ours


def test_partial_rotary_factor_and_head_dim():
    config = v4(rope_theta=1e4, max_position_embeddings=2048, partial_rotary_factor=0.5)
    assert rope_settings(config)["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert head_dim(config) == 64 and rotary_dim(config) == 32
    config = {**config, "head_dim": 128}
    assert head_dim(config) == 128 and rotary_dim(config) == 64
    v5 = v4(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}, max_position_embeddings=8)
    assert rotary_dim(v5) == 16


def test_apply_writes_v5_and_removes_v4_keys_without_touching_the_input():
    config = v4(rope_theta=5e5, max_position_embeddings=8192, rope_scaling=None)
    params = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 8192}
    written = apply_rope_settings(config, params, 32768)
    assert "rope_theta" not in written and "rope_scaling" not in written
    assert written["rope_parameters"] == params and written["max_position_embeddings"] == 32768
    assert config["rope_theta"] == 5e5 and config["max_position_embeddings"] == 8192  # input untouched
    params["factor"] = 99.0
    assert written["rope_parameters"]["factor"] == 4.0  # no shared dicts
    assert rope_settings(written) == {"rope_parameters": {**params, "factor": 4.0}, "max_position_embeddings": 32768}


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"type": "linear", "factor": 4.0},
        {"type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "truncate": False},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 1024},
    ],
)
def test_round_trip_through_transformers(tmp_path, scaling):
    """v4 dict -> transformers saves it (v5) -> we read the same settings; our v5 write -> transformers reads ours."""
    from transformers import AutoConfig, LlamaConfig

    config = v4(rope_theta=250000.0, max_position_embeddings=8192, **({"rope_scaling": scaling} if scaling else {}))
    ours_from_v4 = rope_settings(config)
    LlamaConfig(**config).save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "rope_theta" not in saved and "rope_parameters" in saved
    assert rope_settings(saved) == ours_from_v4

    written = apply_rope_settings(config, ours_from_v4["rope_parameters"], ours_from_v4["max_position_embeddings"])
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(written))
    loaded = AutoConfig.from_pretrained(tmp_path / "ours")
    expected = dict(ours_from_v4["rope_parameters"])
    assert {key: loaded.rope_parameters[key] for key in expected} == expected
    assert loaded.max_position_embeddings == 8192
    # and the frequencies we compute from our dict are the model's
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(loaded)
    inv_freq, attention = rope_frequencies(written)
    torch.testing.assert_close(inv_freq, rotary.inv_freq, rtol=1e-6, atol=0)
    assert attention == pytest.approx(rotary.attention_scaling)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "gpt2", "n_positions": 1024, "n_embd": 768}, "no RoPE settings"),
        (v4(rope_theta=1e4), "max_position_embeddings"),
        (v4(rope_theta=1e4, max_position_embeddings="long"), "max_position_embeddings"),
        (v4(rope_parameters=[1, 2], max_position_embeddings=10), "not a dict"),
        (
            v4(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
               max_position_embeddings=10),
            "per layer type",
        ),
    ],
)
def test_bad_configs_fail_with_one_line(config, message):
    with pytest.raises(LongctxError, match=message) as error:
        rope_settings(config)
    assert "\n" not in str(error.value)


def test_head_dim_needs_sizes():
    with pytest.raises(LongctxError, match="head_dim"):
        head_dim({"model_type": "llama"})


def test_rope_frequencies_rejects_unsupported_type():
    with pytest.raises(LongctxError, match="not supported"):
        rope_frequencies(v4(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}, max_position_embeddings=8))


def test_rope_types_of_any_model_evaluation_may_load():
    assert rope_types(v4(rope_theta=1e4, max_position_embeddings=8)) == {"default"}
    assert rope_types(v4(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8)) == {"dynamic"}
    per_layer = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                 "full_attention": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}}
    assert rope_types(v4(rope_parameters=per_layer, max_position_embeddings=8)) == {"default", "dynamic"}
    assert per_layer["full_attention"]["rope_type"] == "dynamic"  # the config is read, not changed
    assert rope_types({"model_type": "gpt2", "n_positions": 1024}) == set()  # no RoPE at all
    with pytest.raises(LongctxError, match="corrupt"):
        rope_types(v4(rope_parameters="yarn"))
