"""merge_adapters against PEFT's own sequential merge_and_unload, on tiny models (and the default model, slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, without_config_key
from safetensors.torch import load_file, save_file

from longctx.errors import LongctxError
from longctx.lora.merge import merge_adapters
from longctx.models import TensorReader
from longctx.models.metadata import read_metadata, write_metadata


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int, model_class=None, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter with random non-zero factors (and modules_to_save copies unlike the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = (model_class or AutoModelForCausalLM).from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(torch.randn_like(parameter) * 0.02)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_merge(base_dir: Path, adapters: list[Path], *, dtype=torch.float32):
    """The old script's flow in float32: PeftModel.from_pretrained + merge_and_unload per adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def load_merged(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_same_weights(ours, reference, tolerance=1e-6):
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert set(ours_state) == set(ref_state)
    for name, expected in ref_state.items():
        error = (ours_state[name].float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-30)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def greedy_text(model, tokenizer_dir: Path, prompt: str = "The quick brown fox", tokens: int = 12) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0])


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def three_adapters(tiny_llama, tmp_path):
    """Different ranks, embedding LoRA, rslora with rank/alpha patterns, modules_to_save in two adapters."""
    return [
        make_adapter(tiny_llama, tmp_path / "a0", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        make_adapter(
            tiny_llama, tmp_path / "a1", seed=2, r=8, lora_alpha=16, use_rslora=True,
            target_modules=["q_proj", "down_proj", "lm_head"], rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3},
            modules_to_save=["lm_head"],
        ),
        make_adapter(tiny_llama, tmp_path / "a2", seed=3, r=2, target_modules=["o_proj", "gate_proj"], modules_to_save=["lm_head"]),
    ]


def test_equals_peft_sequential_merge(tiny_llama, three_adapters, tmp_path, caplog):
    result = merge_adapters(tiny_llama, three_adapters, tmp_path / "merged", progress=False)
    reference = peft_merge(tiny_llama, three_adapters)
    ours = load_merged(tmp_path / "merged")
    assert_same_weights(ours, reference)
    assert greedy_text(ours, tiny_llama) == greedy_text(reference, tiny_llama)
    assert result.changed_tensors == 12  # q,v x2 + embed; down x2 + lm_head; o,gate x2
    assert any("lm_head is saved in full by both a1 and a2" in w for w in result.warnings)
    assert "lm_head" in caplog.text
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert read_metadata(tmp_path / "merged") is None  # no rope settings were carried


def test_every_embedding_delta_is_kept(tiny_llama, tmp_path):
    """PEFT loads each embedding adapter's saved copy of the embedding over the model's, erasing earlier
    adapters' embedding deltas; we add every delta to the base's embedding (and warn when a copy differs)."""
    from longctx.lora.adapter import load_adapter

    adapters = [
        make_adapter(tiny_llama, tmp_path / f"e{i}", seed=20 + i, r=2 + i, target_modules=["embed_tokens", "q_proj"]) for i in range(2)
    ]
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(adapters[1] / "adapter_model.safetensors")
    save_file({**tensors, key: tensors[key] + 1.0}, adapters[1] / "adapter_model.safetensors")

    result = merge_adapters(tiny_llama, adapters, tmp_path / "merged", progress=False)
    assert any("e1 was trained on a different model.embed_tokens.weight" in w for w in result.warnings)
    ours = load_merged(tmp_path / "merged").state_dict()
    base = load_merged(tiny_llama).state_dict()
    deltas = [load_adapter(a).loras["model.embed_tokens"] for a in adapters]
    expected = base["model.embed_tokens.weight"] + sum(f.scaling * (f.B @ f.A).T for f in deltas)
    assert torch.allclose(ours["model.embed_tokens.weight"], expected, atol=1e-6)
    reference = peft_merge(tiny_llama, adapters).state_dict()
    assert not torch.allclose(reference["model.embed_tokens.weight"], expected, atol=1e-3)  # PEFT lost e0's delta
    for name in ours:
        if name != "model.embed_tokens.weight":
            assert torch.allclose(ours[name], reference[name], atol=1e-6), name


def test_weights_scale_each_adapters_deltas(tiny_llama, three_adapters, tmp_path):
    # PEFT has no per-adapter weight on merge: scale lora_B in a copy of each adapter instead.
    scaled = []
    for adapter, weight in zip(three_adapters[:2], [0.5, -1.5]):
        copy = tmp_path / f"{adapter.name}-scaled"
        copy.mkdir()
        (copy / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors = {k: v * weight if ("lora_B" in k or "lora_embedding_B" in k) else v for k, v in tensors.items()}
        save_file(tensors, copy / "adapter_model.safetensors")
        scaled.append(copy)
    merge_adapters(tiny_llama, three_adapters[:2], tmp_path / "merged", weights=[0.5, -1.5], progress=False)
    assert_same_weights(load_merged(tmp_path / "merged"), peft_merge(tiny_llama, scaled))


def test_bf16_base_stays_bf16_and_is_rounded_once(tmp_path):
    base = make_tiny_llama(tmp_path / "base-bf16", dtype=torch.bfloat16)
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=i, r=4, target_modules=["q_proj", "up_proj"]) for i in range(3)]
    merge_adapters(base, adapters, tmp_path / "merged", progress=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    reference = peft_merge(base, adapters, dtype=torch.float32).state_dict()  # exact float32 sums of bf16 weights
    with TensorReader(tmp_path / "merged") as reader:
        for name in reader.names():
            merged, exact = reader.get(name), reference[name]
            assert merged.dtype == torch.bfloat16
            # rounded once: within half a bf16 step of the float32 sum (float32 summation order aside)
            assert ((merged.float() - exact).abs() <= exact.abs() * 2**-8 * 1.001 + 1e-12).all(), name
            assert (merged != exact.to(torch.bfloat16)).float().mean() < 0.01, name


def test_dtype_flag_casts_output(tiny_llama, three_adapters, tmp_path):
    merge_adapters(tiny_llama, three_adapters[:1], tmp_path / "merged", dtype="float16", progress=False)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "float16"
    reference = peft_merge(tiny_llama, three_adapters[:1]).state_dict()
    with TensorReader(tmp_path / "merged") as reader:
        for name in reader.names():
            assert torch.equal(reader.get(name), reference[name].to(torch.float16)), name


def test_tied_embeddings_follow_peft(tmp_path):
    base = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    lora_on_both = make_adapter(base, tmp_path / "emb", seed=4, r=4, target_modules=["embed_tokens", "lm_head", "k_proj"])
    saves_head = make_adapter(base, tmp_path / "head", seed=5, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])

    # LoRA deltas on embed_tokens and lm_head both land in the one shared tensor: still tied.
    result = merge_adapters(base, [lora_on_both], tmp_path / "still-tied", progress=False)
    assert result.untied == []
    assert "lm_head.weight" not in TensorReader(tmp_path / "still-tied").names()
    assert_same_weights(load_merged(tmp_path / "still-tied"), peft_merge(base, [lora_on_both]))

    # A full lm_head copy unties them: both written, tie_word_embeddings false, like PEFT's save_pretrained.
    result = merge_adapters(base, [lora_on_both, saves_head], tmp_path / "untied", progress=False)
    assert result.untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    ours = load_merged(tmp_path / "untied")
    reference = peft_merge(base, [lora_on_both, saves_head])
    assert_same_weights(ours, reference)
    assert greedy_text(ours, base) == greedy_text(reference, base)


@pytest.mark.parametrize("ensure_weight_tying", [False, True])
def test_saved_tied_embedding_follows_ensure_weight_tying(tmp_path, ensure_weight_tying):
    base = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "a", seed=6, r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                           ensure_weight_tying=ensure_weight_tying)
    result = merge_adapters(base, [adapter], tmp_path / "merged", progress=False)
    reference = peft_merge(base, [adapter])
    assert (result.untied == []) == ensure_weight_tying == reference.config.tie_word_embeddings
    assert_same_weights(load_merged(tmp_path / "merged"), reference)


def test_fan_in_fan_out_and_lora_bias_on_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(base)
    adapter = make_adapter(
        base, tmp_path / "conv1d", seed=6, r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True
    )
    merge_adapters(base, [adapter], tmp_path / "merged", progress=False)
    assert_same_weights(load_merged(tmp_path / "merged"), peft_merge(base, [adapter]))


def test_sharded_base_gives_sharded_output(tmp_path):
    base = make_tiny_llama(tmp_path / "sharded", max_shard_size="100KB")
    assert (base / "model.safetensors.index.json").is_file()
    adapter = make_adapter(base, tmp_path / "a", seed=7, r=4, target_modules=["q_proj", "down_proj"])
    result = merge_adapters(base, [adapter], tmp_path / "merged", max_shard_bytes=100_000, progress=False)
    assert len(result.shard_files) > 1
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.shard_files)
    assert_same_weights(load_merged(tmp_path / "merged"), peft_merge(base, [adapter]))


YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}


def test_rope_metadata_applied_to_config(tiny_llama, three_adapters, tmp_path):
    long_adapter = three_adapters[2]
    write_metadata(long_adapter, "lora-adapter", rope_parameters=YARN, max_position_embeddings=1024)
    result = merge_adapters(tiny_llama, three_adapters, tmp_path / "merged", progress=False)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_parameters"] == YARN and config["max_position_embeddings"] == 1024
    assert result.rope.source == "a2"
    metadata = read_metadata(tmp_path / "merged")
    assert metadata["kind"] == "merged-model" and metadata["max_position_embeddings"] == 1024
    assert [entry["path"] for entry in metadata["adapters"]] == [str(p) for p in three_adapters]
    model = load_merged(tmp_path / "merged")
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.max_position_embeddings == 1024

    merge_adapters(tiny_llama, three_adapters, tmp_path / "kept", keep_base_config=True, progress=False)
    kept = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert kept["max_position_embeddings"] == 256 and kept["rope_parameters"]["rope_type"] == "default"


def test_disagreeing_rope_metadata_warns_and_last_wins(tiny_llama, three_adapters, tmp_path):
    write_metadata(three_adapters[0], "lora-adapter", rope_parameters={"rope_type": "default", "rope_theta": 40000.0}, max_position_embeddings=512)
    write_metadata(three_adapters[1], "lora-adapter", rope_parameters=YARN, max_position_embeddings=1024)
    result = merge_adapters(tiny_llama, three_adapters[:2], tmp_path / "merged", progress=False)
    assert any("disagree on rope settings" in w for w in result.warnings)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["max_position_embeddings"] == 1024


def _dora(base, tmp_path):
    return make_adapter(base, tmp_path / "dora", seed=8, r=2, target_modules=["q_proj"], use_dora=True)


def _other_size(base, tmp_path):
    other = make_tiny_llama(tmp_path / "wider", hidden_size=32)
    return make_adapter(other, tmp_path / "wider-adapter", seed=9, r=2, target_modules=["q_proj"])


def _unknown_module(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "renamed", seed=10, r=2, target_modules=["q_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    return adapter


def _ia3(base, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    return tmp_path / "ia3"


def _pickle(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "pickled", seed=11, r=2, target_modules=["q_proj"])
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    return adapter


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (_dora, "DoRA"),
        (_other_size, "has shape"),
        (_unknown_module, "is not in the base model"),
        (_ia3, "IA3 adapter"),
        (_pickle, "--allow-pickle"),
    ],
)
def test_bad_adapters_fail_before_writing(tiny_llama, three_adapters, tmp_path, make_bad, message):
    bad = make_bad(tiny_llama, tmp_path)
    with pytest.raises(LongctxError, match=message):
        merge_adapters(tiny_llama, [three_adapters[0], bad], tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_adapter_config_is_read_as_peft_reads_it(tiny_llama, three_adapters, tmp_path, caplog):
    """PEFT's defaults fill in missing fields, a key written by a newer PEFT is dropped with a
    warning (as PeftModel.from_pretrained drops it), and a config PEFT rejects fails in one
    line before anything is written."""
    adapter = three_adapters[1]  # lora_alpha 16, rslora, rank and alpha patterns
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_alpha"]  # PEFT's default, 8, applies
    config["a_field_from_a_newer_peft"] = {"enabled": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merge_adapters(tiny_llama, [adapter], tmp_path / "merged", progress=False)
    assert_same_weights(load_merged(tmp_path / "merged"), peft_merge(tiny_llama, [adapter]))
    assert "a_field_from_a_newer_peft" in caplog.text

    config["layers_pattern"] = "layers"  # without layers_to_transform, which PEFT requires with it
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LongctxError, match="not a valid LoRA config.*layers_to_transform"):
        merge_adapters(tiny_llama, [adapter], tmp_path / "bad", progress=False)
    assert leftovers(tmp_path, "bad") == []


def test_unreadable_inputs_fail_in_one_line(tiny_llama, three_adapters, tmp_path):
    """A truncated adapter file (safetensors' own error) and a base config transformers cannot
    read become one-line errors, before anything is written."""
    truncated = three_adapters[0] / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    with pytest.raises(LongctxError, match="adapter_model.safetensors: .*corrupt or truncated"):
        merge_adapters(tiny_llama, three_adapters[:1], tmp_path / "out", progress=False)
    no_type = without_config_key(tiny_llama, tmp_path / "no-model-type", "model_type")
    with pytest.raises(LongctxError, match="cannot read the config of"):
        merge_adapters(no_type, three_adapters[1:2], tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_bad_arguments_fail_before_writing(tiny_llama, three_adapters, tmp_path):
    with pytest.raises(LongctxError, match="2 weights for 1 adapters"):
        merge_adapters(tiny_llama, three_adapters[:1], tmp_path / "out", weights=[1, 2], progress=False)
    with pytest.raises(LongctxError, match="does not exist"):
        merge_adapters(tiny_llama, [tmp_path / "missing"], tmp_path / "out", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(LongctxError, match="no CUDA device"):
            merge_adapters(tiny_llama, three_adapters[:1], tmp_path / "out", device="cuda", progress=False)
    assert leftovers(tmp_path, "out") == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LongctxError, match="--overwrite"):
        merge_adapters(tiny_llama, three_adapters[:1], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    merge_adapters(tiny_llama, three_adapters[:1], tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_old_script_flags_work(tiny_llama, three_adapters, tmp_path, capsys):
    from longctx.commands.merge_adapters import legacy_main

    argv = [
        "--base_model_name_or_path", str(tiny_llama),
        "--peft_model_paths", *map(str, three_adapters),
        "--output_dir", str(tmp_path / "legacy"),
        "--device", "cpu",
        "--trust_remote_code",
    ]
    assert legacy_main(argv) == 0
    assert "merged 3 adapter(s)" in capsys.readouterr().out
    assert_same_weights(load_merged(tmp_path / "legacy"), peft_merge(tiny_llama, three_adapters))

    # --push_to_hub fails at once, before any work, where the hub is unreachable
    pushed = ["--base_model_name_or_path", str(tiny_llama), "--peft_model_paths", str(three_adapters[0]),
              "--output_dir", str(tmp_path / "pushed"), "--push_to_hub"]
    assert legacy_main(pushed) == 2
    assert "cannot reach the Hugging Face hub" in capsys.readouterr().err
    assert leftovers(tmp_path, "pushed") == []


def test_longctx_command_takes_old_and_new_flags(tiny_llama, three_adapters, tmp_path, capsys):
    from longctx.cli import main

    code = main([
        "merge-adapters", "--base_model_name_or_path", str(tiny_llama), "--peft_model_paths", *map(str, three_adapters[:2]),
        "--output_dir", str(tmp_path / "out"), "--weights", "1", "0.25", "--dtype", "bfloat16",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "weight 0.25" in out and "bfloat16" in out and "no adapter carries any" in out
    assert main(["merge-adapters", "--peft_model_paths", str(three_adapters[0]), "--output_dir", str(tmp_path / "x")]) == 2
    assert "--base_model_name_or_path is required" in capsys.readouterr().err


def test_long_context_adapter_from_extract_lora_gives_back_the_extended_model(tiny_llama, tmp_path):
    """base --extract-lora(extended)--> adapter --merge into base--> extended's config, and its weights
    within the extraction error the report measured."""
    from transformers import AutoModelForCausalLM

    from longctx.lora.extract import extract_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    changed = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "o_proj.weight")):
                out_features, in_features = parameter.shape
                delta = torch.randn(out_features, 3, generator=generator) @ torch.randn(3, in_features, generator=generator) * 0.02
                if "layers.1.self_attn.q_proj" in name:  # beyond rank 4: a measurable extraction error
                    delta += torch.randn(parameter.shape, generator=generator) * 0.01
                parameter.add_(delta)
                changed[name] = delta
    model.config.rope_parameters = dict(YARN)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "extended")
    report = extract_lora(tiny_llama, tmp_path / "extended", tmp_path / "long-lora", rank=4, show_progress=False)

    merge_adapters(tiny_llama, [tmp_path / "long-lora"], tmp_path / "merged", progress=False)
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    extended_config = json.loads((tmp_path / "extended" / "config.json").read_text())
    assert merged_config["rope_parameters"] == extended_config["rope_parameters"]
    assert merged_config["max_position_embeddings"] == extended_config["max_position_embeddings"] == 1024

    errors = {m["module"]: m["relative_error"] for m in report["modules"] if "relative_error" in m}
    merged = load_merged(tmp_path / "merged").state_dict()
    extended = model.state_dict()
    for name, expected in extended.items():
        if name in changed:
            error = ((merged[name] - expected).norm() / changed[name].norm()).item()
            assert error <= errors[name.removesuffix(".weight")] + 1e-5, name
        else:
            assert torch.allclose(merged[name], expected, atol=1e-6), name
    assert errors["model.layers.1.self_attn.q_proj"] > 0.1  # the one full-rank delta really is approximate


def synthetic_adapter(base_dir: Path, out_dir: Path, *, seed: int, r: int, lora_alpha: int, target_modules: list[str], modules_to_save=()) -> Path:
    """A random PEFT LoRA adapter written straight from the base's tensor shapes (no model load: fast on real models)."""
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with TensorReader(base_dir) as reader:
        for name in reader.names():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in target_modules:
                out_features, in_features = reader.shape(name)
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_features, generator=generator) / in_features**0.5
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, r, generator=generator) * 0.02
        for module in modules_to_save:  # lm_head of a tied model: the shared embedding plus noise
            source = reader.get("model.embed_tokens.weight" if module == "lm_head" else f"{module}.weight")
            tensors[f"base_model.model.{module}.weight"] = source + torch.randn(source.shape, generator=generator) * 0.01
    LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, modules_to_save=list(modules_to_save) or None).save_pretrained(out_dir)
    save_file(tensors, Path(out_dir) / "adapter_model.safetensors")
    return Path(out_dir)


@pytest.mark.slow
def test_default_model_three_adapters_equal_peft(default_model_dir, tmp_path):
    """The issue's correctness item on SmolLM2-135M: three random LoRAs, ranks 4/8/16, one saving lm_head."""
    adapters = [
        synthetic_adapter(default_model_dir, tmp_path / "a0", seed=1, r=4, lora_alpha=4, target_modules=["q_proj"]),
        synthetic_adapter(default_model_dir, tmp_path / "a1", seed=2, r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"]),
        synthetic_adapter(default_model_dir, tmp_path / "a2", seed=3, r=16, lora_alpha=8, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"]),
    ]
    result = merge_adapters(default_model_dir, adapters, tmp_path / "merged", progress=False)
    assert result.changed_tensors == 4 * 30 + 1 and result.untied == ["lm_head.weight"]
    reference = peft_merge(default_model_dir, adapters)
    ours = load_merged(tmp_path / "merged")
    assert_same_weights(ours, reference)
    prompt = "The capital of France is"
    assert greedy_text(ours, default_model_dir, prompt, 12) == greedy_text(reference, default_model_dir, prompt, 12)


def test_a_merge_that_lengthens_the_context_tells_the_tokenizer(tmp_path):
    """On main the merged model kept the base tokenizer's model_max_length while its config said the
    context is longer: tokenizer(text, truncation=True) cut at the old length."""
    from transformers import AutoConfig, AutoTokenizer

    from longctx.lora.extract import extract_lora
    from longctx.models.extend import extend_model

    base = make_tiny_llama(tmp_path / "base")
    tuned = make_tiny_llama(tmp_path / "tuned", seed=1)
    extended = extend_model(tuned, tmp_path / "tuned-1k", 1024, "linear").output
    extract_lora(base, extended, tmp_path / "long-lora", rank=2, show_progress=False, workers=1)
    merged = merge_adapters(base, [tmp_path / "long-lora"], tmp_path / "merged", progress=False).output_dir
    assert AutoConfig.from_pretrained(merged).max_position_embeddings == 1024
    assert AutoTokenizer.from_pretrained(merged).model_max_length == 1024
    assert AutoTokenizer.from_pretrained(base).model_max_length == 256
