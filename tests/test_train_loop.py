"""The training loop on a tiny Llama: stages change rope, outputs reload, resume is exact, LoRA merges."""

import json

import pytest
import torch
import yaml
from conftest import make_tiny_llama

from longctx.errors import LongctxError
from longctx.models.metadata import read_metadata
from longctx.train.api import train_after_extend, train_from_config
from longctx.train.checkpoint import read_metrics

STAGES = [
    {"seq_len": 256, "steps": 3, "learning_rate": 3e-3, "batch_size": 2},
    {"seq_len": 512, "rope": {"method": "linear"}, "steps": 3, "learning_rate": 2e-3, "gradient_accumulation": 2},
    {"seq_len": 1024, "rope": {"theta": 40000}, "steps": 2, "learning_rate": 1e-3},
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as handle:
        for i in range(40):
            handle.write(json.dumps({"text": f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (i % 9 + 1)}) + "\n")
    return path


def write_config(tmp_path, model, corpus, **overrides):
    config = {
        "model": str(model),
        "output": str(tmp_path / "out"),
        "seed": 1,
        "loss_chunk_size": 100,
        "data": {"source": "files", "paths": [str(corpus)]},
        "logging": {"checkpoint_every": 2},
        "stages": STAGES,
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(checkpoint_dir):
    return [(m["global_step"], m["loss"]) for m in read_metrics(checkpoint_dir / "metrics.jsonl") if "loss" in m]


def test_stages_set_rope_and_every_checkpoint_reloads_with_it(tmp_path, tiny_llama, corpus):
    from transformers import AutoModelForCausalLM

    output = train_from_config(write_config(tmp_path, tiny_llama, corpus), progress=False)
    checkpoints = tmp_path / "out-checkpoints"
    expected = [
        ({"rope_type": "default", "rope_theta": 10000.0}, 256),
        ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 512),
        ({"rope_type": "default", "rope_theta": 40000.0}, 1024),
    ]
    for (rope, max_positions), stage in zip(expected, ["stage-1-256", "stage-2-512", "stage-3-1024"]):
        model = AutoModelForCausalLM.from_pretrained(checkpoints / stage)
        assert model.config.max_position_embeddings == max_positions
        assert {k: model.config.rope_parameters[k] for k in rope} == rope
        # the rotary buffers of the reloaded model follow its config
        factor = rope.get("factor", 1.0)
        theta = rope["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)) / factor
        torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq)
    final = AutoModelForCausalLM.from_pretrained(output)
    stage3 = AutoModelForCausalLM.from_pretrained(checkpoints / "stage-3-1024")
    for (name, a), (_, b) in zip(final.state_dict().items(), stage3.state_dict().items()):
        assert torch.equal(a, b), name
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(final.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)

    metadata = read_metadata(output)
    assert metadata["kind"] == "trained-model" and metadata["max_position_embeddings"] == 1024
    assert metadata["rope_parameters"]["rope_theta"] == 40000.0
    assert [s["seq_len"] for s in metadata["stages"]] == [256, 512, 1024]
    assert [s["tokens"] for s in metadata["stages"]] == [3 * 512, 3 * 1024, 2 * 1024]
    assert metadata["stages"][1]["rope"]["rope_parameters"]["rope_type"] == "linear"
    steps = losses(checkpoints)
    assert [s for s, _ in steps] == list(range(1, 9))
    assert (output / "train_log.jsonl").is_file() and (output / "tokenizer.json").is_file()


def test_kill_and_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_llama, corpus):
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir(), cut_dir.mkdir()
    train_from_config(write_config(whole_dir, tiny_llama, corpus), progress=False)
    cut_config = write_config(cut_dir, tiny_llama, corpus)
    # killed after 5 steps: the last state was saved at step 4 (checkpoint_every 2), step 5 is lost
    assert train_from_config(cut_config, progress=False, stop_after_steps=5) is None
    with pytest.raises(LongctxError, match="pass --resume"):
        train_from_config(cut_config, progress=False)
    assert train_from_config(cut_config, progress=False, stop_after_steps=1, resume=True) is None  # killed again
    saved = [json.loads(path.read_text()) for path in (cut_dir / "out-checkpoints").glob("*/trainer_state.json")]
    assert saved and all(state["data_resume"]["record"] >= 0 for state in saved)  # resumed by seeking, not replay
    output = train_from_config(cut_config, progress=False, resume=True)
    assert losses(cut_dir / "out-checkpoints") == losses(whole_dir / "out-checkpoints")
    for name in ("model.safetensors",):
        from safetensors.torch import load_file

        a, b = load_file(output / name), load_file(whole_dir / "out" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_mode_trains_attention_lora_embeddings_and_norms_and_merges(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_llama(tmp_path / "tiny", tie_word_embeddings=True)
    config = write_config(tmp_path, model_dir, corpus, mode="lora", lora={"r": 4, "alpha": 8},
                          activation_checkpointing=True, stages=STAGES[:2])
    output = train_from_config(config, progress=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(output)
    changed = {name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, base.state_dict()[name])}
    assert any("self_attn.q_proj" in n for n in changed) and any("self_attn.o_proj" in n for n in changed)
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert any("input_layernorm" in n for n in changed)
    assert not any("mlp" in n for n in changed)  # LoRA only on attention; MLPs stay frozen
    assert trained.config.rope_parameters["rope_type"] == "linear"


def test_train_after_extend_trains_the_extended_model(tmp_path, tiny_llama, corpus):
    config = write_config(tmp_path, "ignored-model", corpus, stages=STAGES[1:2], output=None)
    output = train_after_extend(tiny_llama, config)
    assert output == tiny_llama.with_name(tiny_llama.name + "-trained")
    assert read_metadata(output)["source_model"] == str(tiny_llama)
    with pytest.raises(LongctxError, match="already exists"):
        train_after_extend(tiny_llama, config)


def test_a_longer_context_reaches_the_tokenizer(tmp_path, tiny_llama, corpus):
    """On main the trained model kept the source tokenizer's model_max_length (256) while its config
    said 512: tokenizer(text, truncation=True) cut at the old length."""
    from transformers import AutoConfig, AutoTokenizer

    output = train_from_config(write_config(tmp_path, tiny_llama, corpus, stages=STAGES[1:2]), progress=False)
    assert AutoConfig.from_pretrained(output).max_position_embeddings == 512
    assert AutoTokenizer.from_pretrained(output).model_max_length == 512
    assert AutoTokenizer.from_pretrained(tmp_path / "out-checkpoints" / "stage-1-512").model_max_length == 512
    assert AutoTokenizer.from_pretrained(tiny_llama).model_max_length == 256  # the source is untouched


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np

    from longctx.train.checkpoint import rng_state, set_rng_state

    saved = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_bfloat16_precision_autocasts_and_saves_in_the_source_dtype(tmp_path, corpus, monkeypatch):
    """The projections compute in bfloat16 while their (master) weights stay float32, and the
    trained model is written back in the source's bfloat16."""
    from transformers import AutoModelForCausalLM

    from longctx.train import loop

    computed = []  # (weight dtype, output dtype) of a projection in each training forward
    load_model = loop.load_model

    def load_and_watch(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        projection = model.model.layers[0].self_attn.q_proj
        projection.register_forward_hook(lambda module, inputs, output: computed.append((module.weight.dtype, output.dtype)))
        return model, tokenizer

    monkeypatch.setattr(loop, "load_model", load_and_watch)
    model_dir = make_tiny_llama(tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    config = write_config(tmp_path, model_dir, corpus, precision="bfloat16", stages=STAGES[:1])
    output = train_from_config(config, progress=False)
    assert len(computed) == STAGES[0]["steps"] and set(computed) == {(torch.float32, torch.bfloat16)}
    trained = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
    assert trained.dtype == torch.bfloat16 and trained.config.dtype == torch.bfloat16
    assert all(m["loss"] == m["loss"] for m in read_metrics(output / "train_log.jsonl") if "loss" in m)
