"""The training config: YAML to dataclasses, and one clear line for each mistake."""

import pytest

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.train.config import load_config, parse_config

MINIMAL = {"model": "m", "stages": [{"seq_len": "1k", "steps": 10, "learning_rate": "2e-5"}]}


def with_stage(**stage):
    return {"model": "m", "stages": [{"seq_len": 1024, "steps": 10, "learning_rate": 1e-5, **stage}]}


def test_a_full_config_parses_into_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: smollm2-135m\noutput: out/x\nmode: lora\nlora: {r: 16, alpha: 32}\n"
        "parallel: {sequence_parallel: 2}\ndata: {source: files, paths: [a.jsonl], streaming: true}\n"
        "stages:\n"
        "  - {seq_len: 16k, rope: {method: yarn}, tokens: 32M, learning_rate: 2e-5, gradient_accumulation: 4}\n"
        "  - {seq_len: 32k, rope: {theta: 1.5e7}, steps: 100, learning_rate: 1e-5, lr_schedule: cosine}\n"
    )
    config = load_config(path)
    first, second = config.stages
    assert (first.seq_len, first.tokens, first.learning_rate, first.gradient_accumulation) == (16384, 32 * 2**20, 2e-5, 4)
    assert first.rope.method == "yarn" and first.total_steps() == 32 * 2**20 // (16384 * 4)
    assert first.total_steps(dp_size=4) == 32 * 2**20 // (16384 * 4 * 4)
    assert second.rope.theta == 1.5e7 and second.rope.method is None and second.total_steps(dp_size=8) == 100
    assert config.mode == "lora" and config.lora.r == 16 and config.parallel.sequence_parallel == 2
    assert config.data.streaming is True and config.data.paths == ["a.jsonl"]
    assert load_config(path, output="elsewhere").output == "elsewhere"


def test_minimal_config_takes_defaults():
    config = parse_config(MINIMAL)
    assert config.stages[0].seq_len == 1024 and config.stages[0].learning_rate == 2e-5
    assert config.data.source == "synthetic-passkey" and config.mode == "full" and config.loss_chunk_size == 4096
    assert config.data.passkey.tasks == ["passkey"]
    assert parse_config({**MINIMAL, "data": {"passkey": {"tasks": "reverse"}}}).data.passkey.tasks == ["reverse"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"stages": MINIMAL["stages"]}, "'model' is missing"),
        ({"model": "m", "stages": []}, "'stages' must be a non-empty list"),
        ({**MINIMAL, "learning_rate": 1}, "unknown key 'learning_rate' in config"),
        (with_stage(tokens=5), "exactly one of 'steps' or 'tokens'"),
        ({"model": "m", "stages": [{"seq_len": 1024, "steps": 1}]}, "stages[0].learning_rate is missing"),
        (with_stage(seq_len="12q"), "stages[0].seq_len: '12q' is not a length"),
        (with_stage(learning_rate="fast"), "stages[0].learning_rate must be float"),
        (with_stage(steps=2.5), "stages[0].steps must be int"),
        (with_stage(batch_size=0), "stages[0].batch_size must be positive"),
        (with_stage(rope={"factor": 2}), "a factor needs a method"),
        (with_stage(rope={"method": "theta"}), "stages[0].rope.method 'theta' is unknown"),
        (with_stage(rope="yarm"), "stages[0].rope.method 'yarm' is unknown"),
        (with_stage(rope={"method": "yarn", "beta_fastest": 64}), "unknown rope option(s) beta_fastest"),
        (with_stage(lr_schedule="linear"), "lr_schedule 'linear' is unknown"),
        ({**MINIMAL, "mode": "qlora"}, "mode 'qlora' is unknown"),
        ({**MINIMAL, "precision": "fp8"}, "precision 'fp8' is unknown"),
        ({**MINIMAL, "data": {"source": "files"}}, "data.paths is empty"),
        ({**MINIMAL, "data": {"source": "web"}}, "data.source 'web' is unknown"),
        ({**MINIMAL, "data": {"passkey": {"tasks": ["passkey", "revers"]}}}, "data.passkey.tasks: unknown task 'revers'"),
        ({**MINIMAL, "data": {"passkey": {"tasks": []}}}, "data.passkey.tasks is empty"),
        ({**MINIMAL, "parallel": {"sequence_parallel": 3}}, "not divisible by 2 x sequence_parallel = 6"),
        ({**MINIMAL, "activation_checkpointing": "yes"}, "activation_checkpointing must be bool"),
        ({**MINIMAL, "lora": {"rank": 8}}, "unknown key 'rank' in lora"),
    ],
)
def test_config_errors_are_one_clear_line(raw, message):
    with pytest.raises(LongctxError) as error:
        parse_config(raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_reports_config_errors_as_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nstages:\n  - {seq_len: 1k, steps: 1, learning_rate: 1e-5, warmup: 3}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longctx: error:") and "unknown key 'warmup' in stages[0]" in err and str(path) in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["train", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
