"""`longctx train --dry-run`: the layout against real FSDP2, the activation terms against what autograd saves, the CLI.

The memory model's end-to-end check against measured peaks of real SmolLM2 steps is
benchmarks/train_memory.py (RESULTS.md); here every part it adds up is held to an independent
reference: rank 0's FSDP2 shards on two real gloo ranks, and the tensors autograd saves in a
transformers Llama decoder layer (exact bytes, float32 and bfloat16 autocast, one document and
packed documents, sdpa and the ring).
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_llama, tiny_llama_config
from longctx.cli import main
from longctx.train.config import parse_config
from longctx.train.dry_run import ModelShape, build_layout, estimate_run, layer_saved_per_token

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 128


def _config(model, **overrides) -> dict:
    config = {"model": str(model), "output": "out/unused", "mode": "full", "activation_checkpointing": True,
              "loss_chunk_size": 64, "parallel": {"sequence_parallel": 1},
              "stages": [{"seq_len": 256, "steps": 1, "learning_rate": 1e-4},
                         {"seq_len": 1024, "steps": 1, "learning_rate": 1e-4}]}
    config.update(overrides)
    return config


def _config_only_model(tmp_path) -> Path:
    """A model directory with nothing but config.json: all the dry run needs."""
    path = tmp_path / "config-only"
    path.mkdir()
    tiny_llama_config().save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    return path


# --- the activation terms against autograd ----------------------------------------------------------


def saved_by_one_layer(layer, rotary, config, position_ids, dtype, attention):
    """Bytes of the distinct storages autograd saves in one decoder layer's forward, and the bytes of
    autocast's weight copies among them (not counting the layer input, the parameters, cos/sin, or
    transformers' boolean mask, which the dry run counts once per step)."""
    from transformers.masking_utils import create_causal_mask

    layer.self_attn.config._attn_implementation = attention
    hidden = torch.randn(1, position_ids.shape[1], config.hidden_size, requires_grad=True)
    cos, sin = rotary(hidden, position_ids)
    mask = None
    if attention == "sdpa":
        mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
    shared = {t.untyped_storage().data_ptr() for t in (hidden, cos, sin, *layer.parameters())}
    if mask is not None:
        shared.add(mask.untyped_storage().data_ptr())
    saved = {}

    def pack(tensor):
        saved.setdefault(tensor.untyped_storage().data_ptr(), (tensor.untyped_storage().nbytes(), tensor.grad_fn))
        return tensor

    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
    activations = {ptr: size for ptr, (size, _) in saved.items() if ptr not in shared}
    weight_casts = sum(size for ptr, (size, grad_fn) in saved.items()
                       if ptr not in shared and type(grad_fn).__name__ == "TBackward0")
    return sum(activations.values()), weight_casts, mask is not None


def _expected(config, tokens, compute, masked) -> int:
    return layer_saved_per_token(ModelShape.from_config(config), compute, "sdpa-masked" if masked else "sdpa") * tokens \
        + (tokens * tokens * compute if masked else 0)  # sdpa's additive copy of the boolean mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_saved_bytes_equal_what_autograd_saves(dtype, packed):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(intermediate_size=160)
    model = LlamaForCausalLM(config)
    half = TOKENS // 2
    positions = torch.cat([torch.arange(half), torch.arange(half)])[None] if packed else torch.arange(TOKENS)[None]
    got, weight_casts, masked = saved_by_one_layer(model.model.layers[0], model.model.rotary_emb, config, positions,
                                                   dtype, "sdpa")
    assert masked == packed  # transformers masks packed documents only
    compute = 2 if dtype == torch.bfloat16 else 4
    layer_weights = sum(p.numel() for name, p in model.model.layers[0].named_parameters() if "norm" not in name)
    assert weight_casts == (compute * layer_weights if dtype == torch.bfloat16 else 0)
    assert got - weight_casts == _expected(config, TOKENS, compute, masked)


def _ring_layer(rank, world_size, dtype):
    import longctx.parallel  # noqa: F401  (registers longctx_ring)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(intermediate_size=160)
    model = LlamaForCausalLM(config)
    got, weight_casts, _ = saved_by_one_layer(model.model.layers[0], model.model.rotary_emb, config,
                                              torch.arange(TOKENS)[None], dtype, "longctx_ring")
    compute = 2 if dtype == torch.bfloat16 else 4
    assert got - weight_casts == _expected(config, TOKENS, compute, masked=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_layer_saves_what_sdpa_saves(dtype):
    from test_parallel_ring import run_ranks

    run_ranks(1, _ring_layer, dtype)


# --- the layout against real FSDP2 ------------------------------------------------------------------


def _real_local_bytes(rank, world_size, config_dict, expected):
    from longctx.train.distributed import Runtime, shard_module
    from longctx.train.loop import load_model
    from longctx.train.loss import CausalLMLoss

    config = parse_config(config_dict)
    runtime = Runtime(rank=rank, world_size=world_size)
    model, _ = load_model(Path(config.model), config, runtime)
    module = CausalLMLoss(model, config.loss_chunk_size)
    shard_module(module, runtime)
    local = [(p.to_local().numel() * 4, p.requires_grad) for p in module.parameters()]
    if rank == 0:
        assert sum(size for size, _ in local) == expected["local_parameters"]
        assert sum(size for size, trainable in local if trainable) == expected["local_trainable"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_layout_equals_rank_zero_of_real_fsdp2(tmp_path, mode):
    from test_parallel_ring import run_ranks

    # 3 KV heads x 16 = 48 rows in k_proj: FSDP2 pads the shards of 2 ranks unevenly for some tensors
    model = make_tiny_llama(tmp_path / "tiny", hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                            intermediate_size=100)
    config = _config(model, mode=mode)
    layout = build_layout(parse_config(config), world_size=2)
    assert layout.local_parameters < layout.parameter_count * 4
    run_ranks(2, _real_local_bytes, config, {"local_parameters": layout.local_parameters,
                                             "local_trainable": layout.local_trainable})


def test_one_rank_holds_the_whole_model(tmp_path):
    from transformers import LlamaForCausalLM

    model = _config_only_model(tmp_path)
    layout = build_layout(parse_config(_config(model)), world_size=1)
    count = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config()).parameters())
    assert layout.parameter_count == count and layout.local_parameters == 4 * count == layout.local_trainable


# --- the command -----------------------------------------------------------------------------------


def _write(tmp_path, config) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_prints_every_stage_and_writes_nothing(tmp_path, capsys):
    model = _config_only_model(tmp_path)
    config = _write(tmp_path, _config(model, output=str(tmp_path / "out"), parallel={"sequence_parallel": 2}))
    assert main(["train", "--config", str(config), "--dry-run", "--world-size", "4"]) == 0
    table = capsys.readouterr().out
    assert "rank 0 of 4 (sequence parallel 2 x data parallel 2" in table
    rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[1], row[2]) for row in rows] == [("1", "256", "128"), ("2", "1024", "512")]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoints").exists()

    assert main(["train", "--config", str(config), "--dry-run", "--world-size", "4", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert [stage["seq_len"] for stage in estimate["stages"]] == [256, 1024]
    first, second = estimate["stages"]
    assert second["activations"] > 3 * first["activations"] and second["total"] > first["total"]
    for stage in estimate["stages"]:
        parts = ("parameters", "gradients", "optimizer", "activations", "loss", "communication")
        assert stage["total"] == sum(stage[part] for part in parts)


def test_longer_local_sequences_cost_activations_not_parameters(tmp_path):
    model = _config_only_model(tmp_path)
    one, two = (estimate_run(parse_config(_config(model, parallel={"sequence_parallel": sp})), world_size=2).stages[1]
                for sp in (1, 2))
    assert two.local_tokens == one.local_tokens // 2
    assert two.activations < one.activations
    assert two.optimizer == one.optimizer  # FSDP2 shards over all ranks either way


@pytest.mark.parametrize("argv, phrase", [
    (["--dry-run", "--world-size", "4", "--gpu-memory", "1MiB"], "stage 1 (seq_len 256) needs"),
    (["--dry-run", "--world-size", "3"], "cannot form groups of parallel.sequence_parallel=2"),
    (["--world-size", "4"], "add --dry-run"),
    (["--gpu-memory", "80GiB"], "add --dry-run"),
    (["--dry-run", "--resume"], "writes nothing"),
    (["--dry-run", "--mfu", "2"], "--mfu must be in (0, 1]"),
])
def test_dry_run_refusals_are_one_line(tmp_path, capsys, argv, phrase):
    model = _config_only_model(tmp_path)
    config = _write(tmp_path, _config(model, parallel={"sequence_parallel": 2}))
    assert main(["train", "--config", str(config), *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert phrase in error


def test_a_model_without_config_is_refused(tmp_path, capsys):
    config = _write(tmp_path, _config("some-org/not-here"))
    assert main(["train", "--config", str(config), "--dry-run"]) == 2
    assert "reads the model's config.json only" in capsys.readouterr().err


def test_llama3_8b_to_1m_at_32_ranks(tmp_path, capsys):
    """The shipped Gradient-like config: rank 0 holds 1/32 of Llama-3-8B and every stage fits 80 GiB;
    with the ring over 8 ranks and a 16K loss chunk the 1M stage does not, and the error names the
    stage and a change that fits."""
    model = str(ROOT / "configs/models/meta-llama-3-8b-instruct")
    shipped = ROOT / "configs/llama3-8b-1m.yaml"
    argv = ["--model", model, "--dry-run", "--world-size", "32", "--gpu-memory", "80GiB"]
    assert main(["train", "--config", str(shipped), *argv, "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["layout"]["parameter_count"] == 8_030_261_248
    assert estimate["layout"]["local_parameters"] == 8_030_261_248 * 4 // 32
    assert [stage["seq_len"] for stage in estimate["stages"]] == [65536, 262144, 524288, 1048576]
    assert all(stage["fits"] for stage in estimate["stages"])

    narrower = yaml.safe_load(shipped.read_text())
    narrower.update(parallel={"sequence_parallel": 8}, loss_chunk_size=16384)
    assert main(["train", "--config", str(_write(tmp_path, narrower)), *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stage 4 (seq_len 1048576)" in error and "try parallel.sequence_parallel: 16" in error
