"""`longctx extend`: outputs checked through what transformers loads; errors leave nothing behind."""

import json
import math
import os
import resource
import struct
import sys
import tracemalloc
import types
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from longctx.cli import main
from longctx.models.metadata import read_metadata
from longctx.models.extend import extend_model
from longctx.rope.methods import (
    default_rope,
    dynamic_ntk_rope,
    linear_rope,
    llama3_rope,
    ntk_rope,
    scaling_law_base,
    yarn_rope,
)

TINY_HEAD_DIM = 16  # conftest's tiny Llama: hidden 64, 4 heads
TINY_LENGTH = 256
TINY_THETA = 1e4


def expected_rope(method, target):
    factor = target / TINY_LENGTH
    return {
        "linear": lambda: linear_rope(TINY_HEAD_DIM, TINY_THETA, factor),
        "ntk": lambda: ntk_rope(TINY_HEAD_DIM, TINY_THETA, factor),
        "scaling-law": lambda: default_rope(TINY_HEAD_DIM, round(scaling_law_base(TINY_THETA, target, TINY_LENGTH))),
        "dynamic": lambda: dynamic_ntk_rope(TINY_HEAD_DIM, TINY_THETA, factor, TINY_LENGTH),
        "yarn": lambda: yarn_rope(TINY_HEAD_DIM, TINY_THETA, factor, TINY_LENGTH),
        "llama3": lambda: llama3_rope(TINY_HEAD_DIM, TINY_THETA, factor, TINY_LENGTH),
    }[method]()


def assert_nothing_written(output: Path):
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == []


@pytest.mark.parametrize("method", ["linear", "ntk", "scaling-law", "dynamic", "yarn", "llama3"])
def test_extend_tiny_llama_loads_in_transformers_with_our_frequencies(tiny_llama, tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / f"out-{method}"
    assert main(["extend", "--model", str(tiny_llama), "--target-len", "1k", "--method", method, "--output", str(output)]) == 0
    assert "hard-linked" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(output)
    inv_freq, attention = expected_rope(method, 1024)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(attention, rel=1e-6)
    # dynamic keeps the original length in max_position_embeddings (transformers' convention)
    assert model.config.max_position_embeddings == (TINY_LENGTH if method == "dynamic" else 1024)
    assert AutoTokenizer.from_pretrained(output).model_max_length == 1024

    source = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), source.state_dict().items()):
        assert torch.equal(ours, theirs), name
    assert os.stat(output / "model.safetensors").st_ino == os.stat(tiny_llama / "model.safetensors").st_ino

    config = json.loads((output / "config.json").read_text())
    assert "rope_theta" not in config and "rope_scaling" not in config
    metadata = read_metadata(output)
    assert metadata["kind"] == "extended-model" and metadata["method"] == method
    assert metadata["rope_parameters"] == config["rope_parameters"]
    assert metadata["max_position_embeddings"] == config["max_position_embeddings"]
    assert metadata["original_max_position_embeddings"] == TINY_LENGTH and metadata["target_len"] == 1024
    assert metadata["source_model"] == str(tiny_llama)
    assert metadata["rope_theta"] == config["rope_parameters"]["rope_theta"]


def test_extend_sharded_v4_model_carries_everything(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    source = make_tiny_llama(tmp_path / "src", max_shard_size="20KB")
    # make it a v4-style config (top-level rope_theta) with a generation config
    config = json.loads((source / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (source / "config.json").write_text(json.dumps(config))
    GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(source)
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) > 1

    result = extend_model(source, tmp_path / "out", 4096, "yarn", beta_fast=16.0, truncate=False)
    out = tmp_path / "out"
    assert sorted(result.weight_files) == sorted(shards + ["model.safetensors.index.json"])
    assert result.linked == len(shards) + 1 and result.copied == 0
    for name in result.weight_files:
        assert os.stat(out / name).st_ino == os.stat(source / name).st_ino
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(result.carried)
    written = json.loads((out / "config.json").read_text())
    assert "rope_theta" not in written
    assert written["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0,
                                          "original_max_position_embeddings": 256, "beta_fast": 16.0, "truncate": False}
    model = AutoModelForCausalLM.from_pretrained(out)
    inv_freq, attention = yarn_rope(TINY_HEAD_DIM, 1e4, 16.0, 256, beta_fast=16.0, truncate=False)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(attention)
    assert read_metadata(out)["beta_fast"] == 16.0


# A Llama-3-8B-shaped model: the real config, real tensor names and shapes, sparse shards
# of the real size (about 16 GB that take no disk space).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "vocab_size": 128256, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False, "hidden_act": "silu",
}


def llama3_8b_tensors():
    hidden, inter, kv, vocab = 4096, 14336, 1024, 128256
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(32):
        prefix = f"model.layers.{layer}."
        for name, shape in [
            ("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.k_proj.weight", (kv, hidden)),
            ("self_attn.v_proj.weight", (kv, hidden)), ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.gate_proj.weight", (inter, hidden)), ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)), ("input_layernorm.weight", (hidden,)),
            ("post_attention_layernorm.weight", (hidden,)),
        ]:
            yield prefix + name, shape
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_sparse_safetensors(path: Path, tensors: dict) -> None:
    """A valid bf16 safetensors file whose data region is a hole (no disk blocks)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        handle.truncate(8 + len(encoded) + offset)


def make_llama3_8b_shaped(directory: Path, shards: int = 4) -> Path:
    from conftest import make_tokenizer

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA3_8B))
    tensors = list(llama3_8b_tensors())
    per_shard = -(-len(tensors) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        part = dict(tensors[index * per_shard:(index + 1) * per_shard])
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        write_sparse_safetensors(directory / name, part)
        weight_map.update({tensor: name for tensor in part})
        total += sum(2 * int(torch.tensor(shape).prod()) for shape in part.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(directory)
    return directory


def bytes_read_by_this_process() -> int:
    """rchar of /proc/self/io: every byte this process has read through read() calls."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(counters["rchar"])


def test_extend_llama3_8b_shaped_links_weights_without_reading_them(tmp_path):
    """Extending an 8B model costs no weight I/O, so it takes seconds whatever the machine's load:
    every weight file of the output is the source's own file (a hard link), and what the process
    reads and touches meanwhile is a few headers, not 16 GB."""
    source = make_llama3_8b_shaped(tmp_path / "llama3-8b")
    tracemalloc.start()
    read_before, faults_before = bytes_read_by_this_process(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    result = extend_model(source, tmp_path / "llama3-1m", 1048576, "scaling-law")
    read = bytes_read_by_this_process() - read_before
    page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.weight_bytes > 15e9  # the real size: 8.03B parameters in bf16
    assert result.linked == 5 and result.copied == 0
    assert all(os.path.samefile(source / name, tmp_path / "llama3-1m" / name) for name in result.weight_files)
    assert read < 16e6 and page_faults * resource.getpagesize() < 16e6  # not one tensor's worth (the embeddings are 1 GB)
    assert peak < 20e6
    config = json.loads((tmp_path / "llama3-1m" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 3580165449.0}
    assert config["max_position_embeddings"] == 1048576
    assert json.loads((tmp_path / "llama3-1m" / "tokenizer_config.json").read_text())["model_max_length"] == 1048576


# Errors: one line, exit status 2, nothing written.


def run_cli(args, capsys):
    capsys.readouterr()  # drop what building the fixture printed
    status = main(args)
    err = capsys.readouterr().err.strip()
    return status, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-len", "256"], "not beyond the model's context length 256"),
        (["--target-len", "128"], "not beyond"),
        (["--target-len", "1k", "--method", "scaling-law", "--factor", "4"], "--factor does not apply to method scaling-law"),
        (["--target-len", "1k", "--method", "yarn", "--factor", "2"], "reaches only 512 tokens"),
        (["--target-len", "1k", "--method", "linear", "--beta-fast", "8"], "--beta-fast does not apply"),
        (["--target-len", "1k", "--method", "ntk", "--factor", "4", "--rope-theta", "1e6"], "give one of them"),
        (["--target-len", "1k", "--method", "llama3", "--low-freq-factor", "4", "--high-freq-factor", "2"], "must be greater"),
    ],
)
def test_cli_rejects_bad_requests_and_writes_nothing(tiny_llama, tmp_path, capsys, extra, message):
    output = tmp_path / "out"
    status, err = run_cli(["extend", "--model", str(tiny_llama), "--output", str(output), *extra], capsys)
    assert status == 2 and message in err and "\n" not in err
    assert_nothing_written(output)


def test_force_writes_a_target_within_the_native_length(tiny_llama, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["extend", "--model", str(tiny_llama), "--target-len", "256", "--method", "yarn", "--force",
                 "--output", str(output)]) == 0
    assert json.loads((output / "config.json").read_text())["rope_parameters"]["factor"] == 1.0


def test_unknown_method_and_bad_length_are_usage_errors(tiny_llama, tmp_path, capsys):
    for extra in (["--target-len", "1k", "--method", "rope"], ["--target-len", "lots"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["extend", "--model", str(tiny_llama), "--output", str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(tiny_llama, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    status, err = run_cli(["extend", "--model", str(tiny_llama), "--target-len", "1K", "--output", str(output)], capsys)
    assert status == 2 and "already exists" in err
    assert (output / "keep.txt").read_text() == "mine"
    assert main(["extend", "--model", str(tiny_llama), "--target-len", "1K", "--output", str(output), "--overwrite"]) == 0
    assert not (output / "keep.txt").exists() and (output / "longctx.json").is_file()
    status, err = run_cli(["extend", "--model", str(output), "--target-len", "2K", "--output", str(output), "--overwrite"], capsys)
    assert status == 2 and "is the model" in err


def corrupt(source: Path, how: str) -> None:
    if how == "missing shard":
        (source / "model.safetensors").unlink()
    elif how == "truncated shard":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "corrupt config":
        (source / "config.json").write_text("{not json")
    elif how == "no rope":
        (source / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024, "n_embd": 64}))
    elif how == "pickle weights":
        (source / "model.safetensors").unlink()
        torch.save({"x": torch.zeros(1)}, source / "pytorch_model.bin")


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing shard", "no weights"),
        ("truncated shard", "corrupt or truncated"),
        ("corrupt config", "not valid JSON"),
        ("no rope", "no RoPE settings"),
        ("pickle weights", "--allow-pickle"),
    ],
)
def test_cli_refuses_broken_models_and_writes_nothing(tmp_path, capsys, how, message):
    source = make_tiny_llama(tmp_path / "src")
    corrupt(source, how)
    output = tmp_path / "out"
    status, err = run_cli(["extend", "--model", str(source), "--target-len", "1k", "--output", str(output)], capsys)
    assert status == 2 and message in err and "\n" not in err
    assert_nothing_written(output)


def test_index_naming_a_missing_tensor_is_refused(tmp_path, capsys):
    source = make_tiny_llama(tmp_path / "src", max_shard_size="20KB")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    status, err = run_cli(["extend", "--model", str(source), "--target-len", "1k", "--output", str(tmp_path / "out")], capsys)
    assert status == 2 and "model.extra.weight" in err
    assert_nothing_written(tmp_path / "out")


def test_allow_pickle_links_pickle_weights(tmp_path, capsys):
    source = make_tiny_llama(tmp_path / "src")
    corrupt(source, "pickle weights")
    output = tmp_path / "out"
    assert main(["extend", "--model", str(source), "--target-len", "1k", "--output", str(output), "--allow-pickle"]) == 0
    assert (output / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("problem", ["missing file", "invalid config"])
def test_train_problems_are_caught_before_anything_is_written(tiny_llama, tmp_path, capsys, problem):
    config = tmp_path / "train.yaml"
    if problem == "missing file":
        message = "train.yaml not found"
    else:
        config.write_text("stages: [{seq_len: 1k, steps: 1}]\n")
        message = "stages[0].learning_rate is missing"
    output = tmp_path / "out"
    status, err = run_cli(["extend", "--model", str(tiny_llama), "--target-len", "1k", "--output", str(output),
                           "--train", str(config)], capsys)
    assert status == 2 and message in err
    assert_nothing_written(output)


def test_train_runs_after_extending(tiny_llama, tmp_path, capsys, monkeypatch):
    import longctx.train.api

    calls = []

    def run_training(config, paths, *, overwrite):
        assert (Path(config.model) / "longctx.json").is_file()  # called after the output is complete
        calls.append((config.model, paths.output, overwrite))
        return tmp_path / "trained"

    monkeypatch.setattr(longctx.train.api, "run_training", run_training)
    (tmp_path / "train.yaml").write_text("stages: [{seq_len: 1k, steps: 1, learning_rate: 1.0e-5}]\n")
    output = tmp_path / "out"
    assert main(["extend", "--model", str(tiny_llama), "--target-len", "1k", "--output", str(output),
                 "--train", str(tmp_path / "train.yaml")]) == 0
    assert calls == [(str(output), tmp_path / "out-trained", False)]
    assert f"trained model: {tmp_path / 'trained'}" in capsys.readouterr().out


def chat_answer(model_dir, question="What is the capital of France?"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return model, tokenizer, tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method_flags",
    [[], ["--method", "yarn", "--attention-factor", "1.0"]],
    ids=["default-method", "yarn-without-temperature"],
)
def test_default_model_extended_to_32k_writes_coherent_text(tmp_path, default_model_dir, method_flags):
    output = tmp_path / "smollm2-32k"
    assert main(["extend", "--target-len", "32k", *method_flags, "--output", str(output)]) == 0
    assert os.path.samefile(output / "model.safetensors", default_model_dir / "model.safetensors")  # linked, not copied
    model, tokenizer, answer = chat_answer(output)
    assert tokenizer.model_max_length == 32768
    assert model.config.max_position_embeddings == read_metadata(output)["max_position_embeddings"]
    assert "capital of France is Paris" in answer, answer


@pytest.mark.slow
def test_default_model_extended_with_standard_yarn_loads_with_its_temperature(tmp_path, default_model_dir):
    """Standard YaRN (attention factor 0.1 ln 4 + 1) loads and runs; on this 135M model its
    temperature degrades short chat answers (see docs/rope.md), so only its numbers are checked."""
    output = tmp_path / "smollm2-32k-yarn"
    assert main(["extend", "--target-len", "32k", "--method", "yarn", "--output", str(output)]) == 0
    model, tokenizer, answer = chat_answer(output)
    assert model.config.max_position_embeddings == 32768 and model.config.rope_parameters["rope_type"] == "yarn"
    inv_freq, attention = yarn_rope(64, 1e5, 4.0, 8192)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(attention) == pytest.approx(0.1 * math.log(4) + 1)
    assert len(tokenizer(answer)["input_ids"]) >= 10  # it writes text, not an immediate end of turn
