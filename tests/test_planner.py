"""The planner's numbers: rope settings per method, the stage ladder, and `longctx plan`."""

import json

import pytest

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.rope.methods import ntk_base
from longctx.rope.planner import (
    DEFAULT_METHOD,
    METHODS,
    auto_stage_lengths,
    geometric_stage_lengths,
    plan,
    rope_for_length,
)

# Meta-Llama-3-8B's config.json (the fields that matter here)
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


@pytest.fixture
def llama3_8b_dir(tmp_path):
    directory = tmp_path / "Meta-Llama-3-8B"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA3_8B))
    return directory


def test_rope_for_length_per_method():
    target = 32768
    expected = {
        "linear": ({"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}, target),
        "ntk": ({"rope_type": "default", "rope_theta": ntk_base(5e5, 4, 128)}, target),
        "scaling-law": ({"rope_type": "default", "rope_theta": 6315089.0}, target),
        "dynamic": ({"rope_type": "dynamic", "rope_theta": 5e5, "factor": 4.0}, 8192),
        "yarn": ({"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 8192}, target),
        "llama3": (
            {"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192},
            target,
        ),
    }
    assert sorted(expected) == sorted(METHODS)
    for method, (params, max_positions) in expected.items():
        settings = rope_for_length(LLAMA3_8B, target, method)
        assert settings["max_position_embeddings"] == max_positions, method
        assert settings["rope_parameters"].keys() == params.keys(), method
        for key, value in params.items():
            assert settings["rope_parameters"][key] == pytest.approx(value, abs=0.5), (method, key)


def test_scaling_law_final_thetas_for_llama3_8b():
    assert rope_for_length(LLAMA3_8B, 262144, "scaling-law")["rope_parameters"]["rope_theta"] == 283461213
    assert rope_for_length(LLAMA3_8B, 1048576, "scaling-law")["rope_parameters"]["rope_theta"] == 3580165449
    assert rope_for_length(LLAMA3_8B, 4194304, "scaling-law")["rope_parameters"]["rope_theta"] == 45218125210


def test_overrides():
    yarn = rope_for_length(LLAMA3_8B, 32768, "yarn", factor=8.0, beta_fast=16, truncate=False)["rope_parameters"]
    assert yarn["factor"] == 8.0 and yarn["beta_fast"] == 16 and yarn["truncate"] is False
    assert rope_for_length(LLAMA3_8B, 32768, "ntk", rope_theta=2e6)["rope_parameters"]["rope_theta"] == 2e6
    assert rope_for_length(LLAMA3_8B, 32768, "ntk", factor=8)["rope_parameters"]["rope_theta"] == pytest.approx(ntk_base(5e5, 8, 128))
    assert rope_for_length(LLAMA3_8B, 32768, "scaling-law", rope_theta=1e7)["rope_parameters"]["rope_theta"] == 1e7
    # dynamic scales to any length, so its factor can be below target / native
    assert rope_for_length(LLAMA3_8B, 32768, "dynamic", factor=1.0)["rope_parameters"]["factor"] == 1.0
    # None means not given
    assert rope_for_length(LLAMA3_8B, 32768, "linear", beta_fast=None)["rope_parameters"]["factor"] == 4.0


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("rope", {}, "unknown method"),
        ("scaling-law", {"factor": 2.0}, "--factor does not apply to method scaling-law"),
        ("linear", {"beta_fast": 8}, "--beta-fast does not apply"),
        ("ntk", {"factor": 4.0, "rope_theta": 1e6}, "give one of them"),
        ("yarn", {"factor": 2.0}, "reaches only 16384 tokens"),
        ("llama3", {"low_freq_factor": 4.0, "high_freq_factor": 2.0}, "must be greater"),
        ("linear", {"factor": 0.5}, "below 1"),
    ],
)
def test_rope_for_length_rejects_bad_requests(method, overrides, message):
    with pytest.raises(LongctxError, match=message):
        rope_for_length(LLAMA3_8B, 32768, method, **overrides)


def test_rescaled_models_start_from_their_pretraining_length():
    llama31 = {**LLAMA3_8B, "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}
    settings = rope_for_length(llama31, 262144, "yarn")
    assert settings["rope_parameters"]["factor"] == 32.0
    assert settings["rope_parameters"]["original_max_position_embeddings"] == 8192
    linear = {**LLAMA3_8B, "max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_for_length(linear, 65536, "linear")["rope_parameters"]["factor"] == 8.0


def test_partial_rotary_factor_is_carried():
    config = {**LLAMA3_8B, "partial_rotary_factor": 0.5}
    params = rope_for_length(config, 32768, "ntk")["rope_parameters"]
    assert params["partial_rotary_factor"] == 0.5
    assert params["rope_theta"] == pytest.approx(ntk_base(5e5, 4, 64))


def test_unsupported_rope_type_is_refused():
    config = {**LLAMA3_8B, "rope_scaling": {"rope_type": "proportional", "partial_rotary_factor": 0.5}}
    with pytest.raises(LongctxError, match="cannot rescale"):
        rope_for_length(config, 32768, "yarn")


def test_auto_stage_ladder():
    assert auto_stage_lengths(8192, 1048576) == [65536, 262144, 524288, 1048576]  # Gradient's schedule
    assert auto_stage_lengths(8192, 32768) == [16384, 32768]
    assert auto_stage_lengths(8192, 16384) == [16384]
    assert auto_stage_lengths(8192, 12000) == [12000]
    assert auto_stage_lengths(4096, 131072) == [8192, 32768, 65536, 131072]
    assert auto_stage_lengths(8192, 4194304) == [32768, 262144, 1048576, 2097152, 4194304]
    assert auto_stage_lengths(8192, 100000) == [24576, 49152, 100000]  # intermediate stages rounded to 1024


def test_geometric_stages():
    assert geometric_stage_lengths(8192, 1048576, 7) == [16384 * 2**i for i in range(7)]
    assert geometric_stage_lengths(8192, 32768, 1) == [32768]
    with pytest.raises(LongctxError, match="fewer stages"):
        geometric_stage_lengths(8192, 9216, 4)


def test_plan_llama3_8b_to_1m_is_gradient_like():
    result = plan(LLAMA3_8B, 1048576, "scaling-law")
    assert [stage.seq_len for stage in result.stages] == [65536, 262144, 524288, 1048576]
    thetas = [stage.rope["rope_parameters"]["rope_theta"] for stage in result.stages]
    assert thetas[1] == 283461213 and thetas[-1] == 3580165449
    assert thetas == sorted(thetas)
    assert result.final == result.stages[-1].rope
    assert result.final["max_position_embeddings"] == 1048576
    assert result.native_len == 8192 and result.learning_rate == 2e-5
    for stage in result.stages:
        assert stage.tokens_per_step % stage.seq_len == 0 and stage.tokens_per_step >= 2**20
        assert stage.tokens == stage.steps * stage.tokens_per_step
    assert result.total_tokens == sum(stage.tokens for stage in result.stages)
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["stages"][0]["rope"]["rope_parameters"]["rope_type"] == "default"


def test_plan_options_and_errors():
    assert plan(LLAMA3_8B, 65536).method == DEFAULT_METHOD == "ntk"
    result = plan(LLAMA3_8B, 65536, "yarn", stages=2, steps_per_stage=10, tokens_per_step=100000, beta_fast=16)
    assert [stage.seq_len for stage in result.stages] == [22528, 65536]
    assert [stage.tokens_per_step for stage in result.stages] == [90112, 131072]
    assert all(stage.rope["rope_parameters"]["beta_fast"] == 16 for stage in result.stages)
    with pytest.raises(LongctxError, match="not beyond the native length"):
        plan(LLAMA3_8B, 8192)
    with pytest.raises(LongctxError, match="'auto' or a whole number"):
        plan(LLAMA3_8B, 65536, stages="many")
    with pytest.raises(LongctxError, match="use `longctx extend`"):
        plan(LLAMA3_8B, 65536, factor=8.0)


def test_cli_plan_json(llama3_8b_dir, capsys):
    assert main(["plan", "--model", str(llama3_8b_dir), "--target-len", "1M", "--method", "scaling-law", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["final"]["rope_parameters"]["rope_theta"] == 3580165449
    assert [stage["seq_len"] for stage in data["stages"]] == [65536, 262144, 524288, 1048576]
    assert data["method"] == "scaling-law" and data["target_len"] == 1048576


def test_cli_plan_table(llama3_8b_dir, capsys):
    assert main(["plan", "--model", str(llama3_8b_dir), "--target-len", "1m", "--method", "scaling-law"]) == 0
    out = capsys.readouterr().out
    assert "3580165449" in out and "1048576" in out and "65536" in out
    assert main(["plan", "--model", str(llama3_8b_dir), "--target-len", "128K", "--stages", "3", "--method", "yarn"]) == 0
    out = capsys.readouterr().out
    assert "yarn x16 from 8192" in out and "131072" in out


def test_cli_plan_errors(llama3_8b_dir, tmp_path, capsys):
    assert main(["plan", "--model", str(llama3_8b_dir), "--target-len", "4k"]) == 2
    assert "not beyond the native length" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "missing"), "--target-len", "64k"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", str(llama3_8b_dir), "--target-len", "64k", "--method", "rope"])
    with pytest.raises(SystemExit):
        main(["plan", "--model", str(llama3_8b_dir), "--target-len", "lots"])
