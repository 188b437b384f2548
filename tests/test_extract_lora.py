"""extract-lora end to end: adapters that PEFT loads onto BASE reproduce EXTENDED."""

import json
import warnings

import pytest
import torch
from conftest import make_tiny_llama, without_config_key
from safetensors.torch import load_file
from test_lowrank import single_thread  # noqa: F401  (autouse: small LAPACK calls on one thread)

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.lora.extract import REPORT_FILE, extract_lora
from longctx.lora.mergekit import extract_lora_with_mergekit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
YARN_X4 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def make_extended(base_dir, out_dir, *, delta_rank=3, scale=0.05, seed=1, norm=False, embeddings=False, bias=False,
                  projections=PROJECTIONS, rope=True, **save_kwargs):
    """EXTENDED = BASE + rank-`delta_rank` deltas on the projections (+ optional norm / embedding / bias changes)."""
    model = load(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in projections:
                left = torch.randn(param.shape[0], delta_rank, generator=generator)
                right = torch.randn(delta_rank, param.shape[1], generator=generator)
                param += scale * left @ right
            if bias and name.endswith("q_proj.bias"):
                param += 0.1 * torch.randn(param.shape, generator=generator)
        if norm:
            model.model.layers[1].post_attention_layernorm.weight += 0.25
        if embeddings:
            model.model.embed_tokens.weight += 0.02 * torch.randn(model.model.embed_tokens.weight.shape, generator=generator)
    if rope:
        model.config.rope_parameters = dict(YARN_X4)
        model.config.max_position_embeddings = 1024
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def merged_through_peft(base_dir, adapter_dir):
    """Load BASE + adapter with PEFT, failing on any missing/unexpected key warning; return the merged model."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load(base_dir), adapter_dir)
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower() or "tie" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return model.merge_and_unload()


def assert_same_weights(model, reference, atol):
    ours, theirs = model.state_dict(), reference.state_dict()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=atol, rtol=0, msg=name)


def in_extended_config(merged, extended_dir):
    """The merged weights in EXTENDED's architecture config (the rope settings merge_adapters applies from the sidecar)."""
    model = load(extended_dir)
    model.load_state_dict(merged.state_dict())
    return model


def logits(model, seed=0):
    ids = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def pair(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    return base, make_extended(base, tmp_path / "extended", norm=True)


def test_round_trip_reproduces_extended_with_gqa_and_changed_norm(pair, tmp_path, monkeypatch):
    monkeypatch.setattr("longctx.lora.extract.COMPARE_BLOCK_BYTES", 4096)  # the unchanged embedding: many blocks
    base, extended = pair
    report = extract_lora(base, extended, tmp_path / "adapter", rank=3, show_progress=False)
    merged, reference = merged_through_peft(base, tmp_path / "adapter"), load(extended)
    assert_same_weights(merged, reference, atol=1e-5)
    torch.testing.assert_close(logits(in_extended_config(merged, extended)), logits(reference), atol=1e-4, rtol=0)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and not config["rank_pattern"]
    assert sorted(config["target_modules"]) == sorted(PROJECTIONS)
    assert config["modules_to_save"] == ["model.layers.1.post_attention_layernorm"]
    by_module = {m["module"]: m for m in report["modules"]}
    k_proj = by_module["model.layers.0.self_attn.k_proj"]
    assert k_proj["shape"] == [32, 64]  # GQA: 2 kv heads x head_dim 16
    assert k_proj["relative_error"] < 1e-5 and k_proj["retained_energy"] > 0.99999
    assert report["summary"]["modules"]["lora"] == 14
    assert report["summary"]["modules"]["modules_to_save"] == 1
    saved = json.loads((tmp_path / "adapter" / REPORT_FILE).read_text())
    assert saved["summary"] == report["summary"]


def test_reported_error_is_the_error_of_the_merged_model(pair, tmp_path):
    base, extended = pair
    report = extract_lora(base, extended, tmp_path / "adapter", rank=1, show_progress=False)
    merged, reference, original = merged_through_peft(base, tmp_path / "adapter"), load(extended), load(base)
    ours, theirs, before = merged.state_dict(), reference.state_dict(), original.state_dict()
    for module in report["modules"]:
        if module["kind"] != "lora":
            continue
        name = module["module"] + ".weight"
        delta = theirs[name] - before[name]
        measured = float(torch.linalg.norm(theirs[name] - ours[name]) / torch.linalg.norm(delta))
        assert measured == pytest.approx(module["relative_error"], rel=1e-3, abs=1e-6)
        assert 0.05 < module["relative_error"] < 1  # rank 1 of a rank-3 delta loses something


def test_energy_selects_the_rank_of_the_delta_per_module(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    extended = make_extended(base, tmp_path / "ext2", delta_rank=2, projections=("q_proj", "o_proj"))
    extended = make_extended(extended, tmp_path / "ext5", delta_rank=5, projections=("down_proj",), seed=2)
    report = extract_lora(base, extended, tmp_path / "adapter", energy=0.99999, show_progress=False)
    ranks = {m["module"].split(".")[-1]: m["rank"] for m in report["modules"] if m["kind"] == "lora"}
    assert ranks == {"q_proj": 2, "o_proj": 2, "down_proj": 5}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and set(config["rank_pattern"].values()) == {5}
    assert config["alpha_pattern"] == config["rank_pattern"]  # scaling 1 everywhere
    assert_same_weights(merged_through_peft(base, tmp_path / "adapter"), load(extended), atol=1e-5)
    capped = extract_lora(base, extended, tmp_path / "capped", energy=0.99999, max_rank=3, show_progress=False)
    assert max(m["rank"] for m in capped["modules"] if m["kind"] == "lora") == 3


def test_tied_embeddings_saved_full_rank(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0, tie_word_embeddings=True)
    extended = make_extended(base, tmp_path / "extended", embeddings=True, norm=True)
    extract_lora(base, extended, tmp_path / "adapter", rank=3, show_progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "embed_tokens" in config["modules_to_save"] and config["ensure_weight_tying"]
    merged, reference = merged_through_peft(base, tmp_path / "adapter"), load(extended)
    assert_same_weights(merged, reference, atol=1e-5)
    torch.testing.assert_close(merged.lm_head.weight, reference.model.embed_tokens.weight)
    torch.testing.assert_close(logits(in_extended_config(merged, extended)), logits(reference), atol=1e-4, rtol=0)
    with pytest.raises(LongctxError, match="tied embeddings"):
        extract_lora(base, extended, tmp_path / "lora-embed", rank=3, embeddings="lora", show_progress=False)


def test_embeddings_as_lora_and_skip(tmp_path, monkeypatch):
    monkeypatch.setattr("longctx.lora.extract.COMPARE_BLOCK_BYTES", 4096)  # large tensors compared block by block
    base = make_tiny_llama(tmp_path / "base", seed=0)
    extended = make_extended(base, tmp_path / "extended", embeddings=True)
    report = extract_lora(base, extended, tmp_path / "adapter", rank=64, embeddings="lora", show_progress=False)
    embedding = next(m for m in report["modules"] if m["module"] == "model.embed_tokens")
    assert embedding["kind"] == "lora_embedding" and embedding["rank"] == 64 and embedding["relative_error"] < 1e-5
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (64, 259)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 64)
    assert_same_weights(merged_through_peft(base, tmp_path / "adapter"), load(extended), atol=1e-5)

    skipped = extract_lora(base, extended, tmp_path / "skip", rank=3, embeddings="skip", show_progress=False)
    embedding = next(m for m in skipped["modules"] if m["module"] == "model.embed_tokens")
    assert embedding["kind"] == "skipped" and "embed" in embedding["reason"]
    assert not any("embed" in key for key in load_file(tmp_path / "skip" / "adapter_model.safetensors"))


def test_bias_deltas_load_as_lora_bias(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0, attention_bias=True)
    extended = make_extended(base, tmp_path / "extended", bias=True, projections=("q_proj", "k_proj"))
    report = extract_lora(base, extended, tmp_path / "adapter", rank=3, show_progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    assert any(m.get("bias_changed") for m in report["modules"])
    merged, reference = merged_through_peft(base, tmp_path / "adapter"), load(extended)
    assert_same_weights(merged, reference, atol=1e-5)


def test_sharded_bf16_inputs_match_unsharded(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0, max_shard_size="20KB")
    extended = make_extended(base, tmp_path / "extended", norm=True, max_shard_size="20KB")
    assert (extended / "model.safetensors.index.json").is_file()
    single = make_extended(base, tmp_path / "single", norm=True)
    extract_lora(base, extended, tmp_path / "sharded-adapter", rank=3, show_progress=False)
    extract_lora(base, single, tmp_path / "single-adapter", rank=3, show_progress=False)
    sharded = load_file(tmp_path / "sharded-adapter" / "adapter_model.safetensors")
    unsharded = load_file(tmp_path / "single-adapter" / "adapter_model.safetensors")
    assert sharded.keys() == unsharded.keys()
    for key in sharded:
        torch.testing.assert_close(sharded[key], unsharded[key])

    bf16_base = make_tiny_llama(tmp_path / "bf16-base", seed=0, dtype=torch.bfloat16)
    bf16_extended = make_extended(bf16_base, tmp_path / "bf16-extended", norm=True)
    report = extract_lora(bf16_base, bf16_extended, tmp_path / "bf16-adapter", rank=64, dtype="bfloat16", show_progress=False)
    assert load_file(tmp_path / "bf16-adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.bfloat16
    assert 1e-4 < report["summary"]["relative_error_max"] < 2e-2  # bf16 factors: honest rounding error


def test_sidecar_carries_extended_rope_settings(pair, tmp_path):
    base, extended = pair
    extract_lora(base, extended, tmp_path / "adapter", rank=2, show_progress=False)
    sidecar = json.loads((tmp_path / "adapter" / "longctx.json").read_text())
    assert sidecar["kind"] == "lora-adapter"
    assert sidecar["max_position_embeddings"] == 1024
    assert sidecar["rope_parameters"] == YARN_X4
    assert sidecar["report_file"] == REPORT_FILE
    assert sidecar["base_model"] == str(base) and sidecar["extended_model"] == str(extended)


def test_target_modules_restrict_and_report_the_rest_as_skipped(pair, tmp_path):
    base, extended = pair
    report = extract_lora(base, extended, tmp_path / "adapter", rank=3, target_modules=["q_proj", "v_proj"], show_progress=False)
    kinds = {m["module"]: m["kind"] for m in report["modules"]}
    assert kinds["model.layers.0.self_attn.q_proj"] == "lora"
    assert kinds["model.layers.0.mlp.down_proj"] == "skipped"
    assert report["summary"]["modules"]["skipped"] == 10
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    merged_through_peft(base, tmp_path / "adapter")
    with pytest.raises(LongctxError, match="match no linear layer"):
        extract_lora(base, extended, tmp_path / "bad", rank=3, target_modules=["qproj"], show_progress=False)


def test_unchanged_modules_are_left_out(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    extended = make_extended(base, tmp_path / "extended", projections=("q_proj",), rope=False)
    extract_lora(base, extended, tmp_path / "adapter", energy=0.9, show_progress=False)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert {key.split(".")[-3] for key in keys} == {"q_proj"}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] is None
    with pytest.raises(LongctxError, match="identical"):
        extract_lora(base, base, tmp_path / "nothing", rank=2, show_progress=False)
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "--rank must be a positive"),
        ({"energy": 0.0}, "--energy must be in"),
        ({"energy": 1.5}, "--energy must be in"),
        ({"rank": 4, "energy": 0.9}, "either --rank or --energy"),
        ({"rank": 4, "max_rank": 8}, "--max-rank caps"),
        ({"embeddings": "half"}, "--embeddings must be one of"),
    ],
)
def test_bad_settings_fail_before_any_work(pair, tmp_path, kwargs, message):
    base, extended = pair
    with pytest.raises(LongctxError, match=message):
        extract_lora(base, extended, tmp_path / "adapter", show_progress=False, **kwargs)
    assert not (tmp_path / "adapter").exists()


def test_incompatible_models_fail_with_one_line_and_nothing_written(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    cases = {
        "wider": make_tiny_llama(tmp_path / "wider", seed=0, hidden_size=128),
        "deeper": make_tiny_llama(tmp_path / "deeper", seed=0, num_hidden_layers=3),
        "vocab": make_tiny_llama(tmp_path / "vocab", seed=0, vocab_size=300),
    }
    with pytest.raises(LongctxError, match="different architectures"):
        extract_lora(base, cases["wider"], tmp_path / "out", rank=2, show_progress=False)
    with pytest.raises(LongctxError, match="different architectures"):
        extract_lora(base, cases["deeper"], tmp_path / "out", rank=2, show_progress=False)
    # a GGUF-converted config names no architecture: still the same model
    unnamed = without_config_key(base, tmp_path / "unnamed", "architectures")
    with pytest.raises(LongctxError, match="identical weights"):
        extract_lora(unnamed, base, tmp_path / "out", rank=2, show_progress=False)
    with pytest.raises(LongctxError, match="vocabulary sizes differ.*--vocab-policy keep-base"):
        extract_lora(base, cases["vocab"], tmp_path / "out", rank=2, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_vocab_keep_base_policy_drops_added_rows_and_reports_them(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    bigger = load(base)
    bigger.resize_token_embeddings(270)
    with torch.no_grad():
        bigger.model.embed_tokens.weight[:259] += 0.01
    bigger.save_pretrained(tmp_path / "bigger")
    report = extract_lora(base, tmp_path / "bigger", tmp_path / "adapter", rank=2, vocab_policy="keep-base", show_progress=False)
    embedding = next(m for m in report["modules"] if m["module"] == "model.embed_tokens")
    assert embedding["kind"] == "modules_to_save" and embedding["dropped_vocabulary_rows"] == 11
    merged = merged_through_peft(base, tmp_path / "adapter")
    torch.testing.assert_close(merged.model.embed_tokens.weight, bigger.model.embed_tokens.weight[:259])


def test_missing_tensor_and_pickle_checkpoints(pair, tmp_path):
    base, extended = pair
    from safetensors.torch import save_file

    tensors = load_file(extended / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((extended / "config.json").read_text())
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongctxError, match="missing from EXTENDED.*up_proj"):
        extract_lora(base, broken, tmp_path / "out", rank=2, show_progress=False)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((extended / "config.json").read_text())
    torch.save(load_file(extended / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(LongctxError, match="--allow-pickle"):
        extract_lora(base, pickled, tmp_path / "out", rank=2, show_progress=False)
    extract_lora(base, pickled, tmp_path / "out", rank=3, allow_pickle=True, show_progress=False)
    assert_same_weights(merged_through_peft(base, tmp_path / "out"), load(extended), atol=1e-5)


def test_cli_writes_adapter_prints_summary_and_refuses_to_overwrite(pair, tmp_path, capsys):
    base, extended = pair
    out = tmp_path / "adapter"
    assert main(["extract-lora", str(base), str(extended), "--output", str(out), "--rank", "3"]) == 0
    printed = capsys.readouterr().out
    assert "14 LoRA" in printed and "relative error" in printed and str(out) in printed
    assert main(["extract-lora", str(base), str(extended), "--output", str(out), "--rank", "3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["extract-lora", str(base), str(extended), "--output", str(out), "--energy", "0.999", "--overwrite"]) == 0
    assert main(["extract-lora", str(base), str(extended), "--output", str(tmp_path / "x"), "--rank", "-1"]) == 2
    assert "--rank must be a positive" in capsys.readouterr().err


def test_mergekit_engine_adds_sidecar_and_measured_report(pair, tmp_path):
    base, extended = pair
    report = extract_lora_with_mergekit(base, extended, tmp_path / "mk", rank=3, show_progress=False)
    assert report["engine"] == "mergekit"
    lora = [m for m in report["modules"] if m["kind"] == "lora"]
    assert len(lora) == 14 and max(m["relative_error"] for m in lora) < 1e-5
    sidecar = json.loads((tmp_path / "mk" / "longctx.json").read_text())
    assert sidecar["max_position_embeddings"] == 1024 and sidecar["engine"] == "mergekit"
    assert_same_weights(merged_through_peft(base, tmp_path / "mk"), load(extended), atol=1e-5)
    with pytest.raises(LongctxError, match="fixed --rank only"):
        extract_lora_with_mergekit(base, extended, tmp_path / "mk2", energy=0.9, show_progress=False)
    with pytest.raises(LongctxError, match="does not support --dtype, --seed; use --engine longctx"):
        extract_lora_with_mergekit(base, extended, tmp_path / "mk2", rank=3, dtype="bfloat16", seed=1, show_progress=False)
    assert not (tmp_path / "mk2").exists()


@pytest.mark.slow
def test_real_default_model_round_trip(default_model_dir, tmp_path):
    """SmolLM2-135M with rank-4 deltas in two layers: base + adapter gives EXTENDED's logits."""
    from longctx.models import SafetensorsWriter, TensorReader, copy_auxiliary_files, read_json, write_json
    from longctx.rope.config import apply_rope_settings

    extended = tmp_path / "extended"
    extended.mkdir()
    generator = torch.Generator().manual_seed(0)
    with TensorReader(default_model_dir) as reader, SafetensorsWriter(
            extended, {name: (reader.shape(name), reader.dtype(name)) for name in reader.names()},
            max_shard_bytes=200 * 1024**2) as writer:
        for name in reader.names():
            tensor = reader.get(name)
            changed = name.startswith(("model.layers.0.", "model.layers.7.")) and name.endswith(
                ("q_proj.weight", "v_proj.weight", "down_proj.weight"))
            if changed:
                left = torch.randn(tensor.shape[0], 4, generator=generator)
                tensor = tensor + 0.02 * left @ torch.randn(4, tensor.shape[1], generator=generator)
            writer.write(name, tensor)
    config = read_json(default_model_dir / "config.json")
    rope = {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0, "original_max_position_embeddings": 8192}
    write_json(extended / "config.json", apply_rope_settings(config, rope, 32768))
    copy_auxiliary_files(default_model_dir, extended)

    report = extract_lora(default_model_dir, extended, tmp_path / "adapter", energy=0.9999, show_progress=False)
    assert {m["rank"] for m in report["modules"] if m["kind"] == "lora"} == {4}
    assert report["summary"]["modules"]["lora"] == 6 and report["summary"]["modules"]["modules_to_save"] == 0
    merged = merged_through_peft(default_model_dir, tmp_path / "adapter")
    torch.testing.assert_close(logits(in_extended_config(merged, extended)), logits(load(extended)), atol=2e-3, rtol=0)
    assert json.loads((tmp_path / "adapter" / "longctx.json").read_text())["max_position_embeddings"] == 32768


def test_parallel_workers_write_the_same_adapter_as_one(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    extended = make_extended(base, tmp_path / "extended", norm=True, bias=False, delta_rank=12)
    reports = {}
    for workers in (1, 2, 3):
        reports[workers] = extract_lora(base, extended, tmp_path / f"adapter-{workers}", rank=4, workers=workers,
                                        show_progress=False)
        assert reports[workers]["summary"]["timings"]["workers"] == workers
    one = (tmp_path / "adapter-1" / "adapter_model.safetensors").read_bytes()
    for workers in (2, 3):
        assert (tmp_path / f"adapter-{workers}" / "adapter_model.safetensors").read_bytes() == one
        without_seconds = [[{k: v for k, v in m.items() if k != "seconds"} for m in reports[w]["modules"]] for w in (1, workers)]
        assert without_seconds[0] == without_seconds[1]
    timings = reports[2]["summary"]["timings"]
    assert {"read", "factorize", "measure error", "write"} <= set(timings["phase_seconds"])
    assert timings["bytes_read"] > 0 and timings["read_mb_per_second"] > 0
    with pytest.raises(LongctxError, match="--workers must be a positive"):
        extract_lora(base, extended, tmp_path / "bad", rank=4, workers=0, show_progress=False)


def test_ordered_parallel_map_keeps_order_and_the_memory_budget():
    """Items run side by side (two of them wait for each other at a barrier, which only works
    with two threads), yet an item costing the whole budget starts only once everything before
    it has been consumed, and nothing after it starts before it is consumed."""
    import threading

    from longctx.lora.threads import ordered_parallel_map

    side_by_side = threading.Barrier(2, timeout=30)
    consumed: list[str] = []

    def work(item):
        name, cost = item
        if name in ("small0", "small1"):
            side_by_side.wait()  # BrokenBarrierError (the test fails) unless both run at once
        if name == "large":
            assert consumed == [f"small{i}" for i in range(6)], consumed
        if name.startswith("after"):
            assert "large" in consumed, consumed
        return name

    items = [(f"small{i}", 1) for i in range(6)] + [("large", 4)] + [(f"after{i}", 1) for i in range(4)]
    for result in ordered_parallel_map(work, items, cost=lambda item: item[1], budget=4, workers=2):
        consumed.append(result)
    assert consumed == [name for name, _ in items]
    assert list(ordered_parallel_map(lambda item: item[0], items[:3], cost=lambda item: item[1], budget=4, workers=1)) == [
        "small0", "small1", "small2"]


def test_ordered_parallel_map_keeps_threads_busy_behind_a_slow_item():
    """With 2 x workers items in flight, the second thread finishes three items while the first,
    which must be yielded first, is still running: the slow item waits for them (an event, no
    sleeps), and times out (the test fails) if they never run."""
    import threading

    from longctx.lora.threads import ordered_parallel_map

    lock, finished, three_done = threading.Lock(), [], threading.Event()

    def work(name):
        if name == "slow":
            assert three_done.wait(timeout=30), f"only {finished} ran while the slow item was running"
        with lock:
            finished.append(name)
            if len(finished) == 3:
                three_done.set()
        return name

    items = ["slow"] + [f"fast{i}" for i in range(5)]
    assert list(ordered_parallel_map(work, items, cost=lambda item: 1, budget=10, workers=2)) == items
    assert finished[:4] == ["fast0", "fast1", "fast2", "slow"]


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {"tie_word_embeddings": True}),
])
def test_layout_read_from_the_checkpoint_matches_transformers(tmp_path, model_type, overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.models.layout import layout_from_checkpoint, layout_from_transformers

    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]  # as save_pretrained stores a tied model
    ours = layout_from_checkpoint(json.loads((tmp_path / "config.json").read_text()), shapes)
    theirs = layout_from_transformers(tmp_path)
    assert ours is not None
    assert (ours.embedding_module, ours.lm_head_module, ours.tied_embeddings) == (
        theirs.embedding_module, theirs.lm_head_module, theirs.tied_embeddings)
    assert ours.module_kind == {module: theirs.module_kind[module] for module in ours.module_kind}
    assert set(ours.module_kind) == {module for module, params in theirs.module_params.items()
                                     if any(f"{module}.{param}" in shapes for param in params)} | {"lm_head"}
    assert {name: ours.param_module[name] for name in shapes} == {name: theirs.param_module[name] for name in shapes}
    assert set(ours.all_modules) <= set(theirs.all_modules)


def test_layout_falls_back_to_transformers_outside_the_known_decoders():
    from longctx.models.layout import layout_from_checkpoint

    shapes = {"model.embed_tokens.weight": (300, 64), "model.layers.0.mlp.up_proj.weight": (128, 64),
              "model.norm.weight": (64,)}
    assert layout_from_checkpoint({"model_type": "llama"}, shapes) is not None
    assert layout_from_checkpoint({"model_type": "gemma"}, shapes) is None
    assert layout_from_checkpoint({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, shapes) is None
    assert layout_from_checkpoint({"model_type": "llama"}, {**shapes, "model.layers.0.experts": (4, 128, 64)}) is None


def test_llama_pair_is_extracted_without_building_the_model_in_transformers(pair, tmp_path, monkeypatch):
    def refuse(model_dir):
        raise AssertionError("transformers was asked for the layout")

    monkeypatch.setattr("longctx.models.layout.layout_from_transformers", refuse)
    base, extended = pair
    extract_lora(base, extended, tmp_path / "adapter", rank=3, show_progress=False)
    assert_same_weights(merged_through_peft(base, tmp_path / "adapter"), load(extended), atol=1e-5)
