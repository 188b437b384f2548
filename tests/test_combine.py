"""merge-adapters --combine against PEFT's add_weighted_adapter, where the semantics match."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_merge_adapters import assert_same_weights, leftovers, load_merged, make_adapter, peft_merge

from longctx.errors import LongctxError
from longctx.lora.combine import combine_adapters, combine_deltas
from longctx.lora.merge import merge_adapters
from longctx.models.metadata import read_metadata, write_metadata

WEIGHTS = [0.7, -0.4]


@pytest.fixture
def two_adapters(tiny_llama, tmp_path):
    """Different ranks and alphas (rslora on one), an embedding LoRA, same target modules."""
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    return [
        make_adapter(tiny_llama, tmp_path / "a0", seed=1, r=4, lora_alpha=8, target_modules=targets),
        make_adapter(tiny_llama, tmp_path / "a1", seed=2, r=6, lora_alpha=3, use_rslora=True, target_modules=targets),
    ]


def peft_combined_deltas(base_dir, adapters, weights, combination_type, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter, returned as each module's delta (get_delta_weight of the new adapter)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters[0], adapter_name="a0")
    for index, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter, adapter_name=f"a{index}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "combined", combination_type=combination_type, **kwargs)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("combined")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "combined" in module.scaling
    }


def our_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    from longctx.lora.adapter import load_adapter

    adapter = load_adapter(adapter_dir)
    deltas = {}
    for module, factors in adapter.loras.items():
        delta = factors.scaling * (factors.B.float() @ factors.A.float())
        deltas[module] = delta.T if factors.transposed else delta
    return deltas


def assert_close_deltas(ours, theirs, tolerance):
    assert set(ours) == set(theirs)
    for module, expected in theirs.items():
        error = (ours[module] - expected).norm() / expected.norm()
        assert error <= tolerance, f"{module}: relative error {error:.2e}"


def test_cat_equals_peft_cat_factor_for_factor(tiny_llama, two_adapters, tmp_path):
    result = combine_adapters(two_adapters, tmp_path / "cat", method="cat", weights=WEIGHTS, progress=False)
    assert result.ranks == [10]
    assert_close_deltas(our_deltas(tmp_path / "cat"), peft_combined_deltas(tiny_llama, two_adapters, WEIGHTS, "cat"), 1e-6)


def test_linear_is_the_exact_weighted_sum_and_loads_in_peft(tiny_llama, two_adapters, tmp_path):
    combine_adapters(two_adapters, tmp_path / "linear", method="linear", weights=WEIGHTS, progress=False)
    # Merging the combined adapter (with PEFT) equals merging the inputs with their weights (with us).
    merge_adapters(tiny_llama, two_adapters, tmp_path / "merged", weights=WEIGHTS, progress=False)
    assert_same_weights(peft_merge(tiny_llama, [tmp_path / "linear"]), load_merged(tmp_path / "merged"), tolerance=1e-5)


def test_svd_equals_peft_svd(tiny_llama, two_adapters, tmp_path):
    combine_adapters(two_adapters, tmp_path / "svd", method="svd", weights=WEIGHTS, svd_rank=5, progress=False)
    config = json.loads((tmp_path / "svd" / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["lora_alpha"] == 5
    theirs = peft_combined_deltas(tiny_llama, two_adapters, WEIGHTS, "svd", svd_rank=5)
    assert_close_deltas(our_deltas(tmp_path / "svd"), theirs, 1e-4)


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_equals_peft_ties_svd(tiny_llama, two_adapters, tmp_path, majority_sign):
    combine_adapters(two_adapters, tmp_path / "ties", method="ties", weights=WEIGHTS, density=0.5, majority_sign=majority_sign, progress=False)
    theirs = peft_combined_deltas(tiny_llama, two_adapters, WEIGHTS, "ties_svd", density=0.5, majority_sign_method=majority_sign)
    assert_close_deltas(our_deltas(tmp_path / "ties"), theirs, 1e-4)


def test_dare_masks_are_seeded_and_rescaled():
    delta = torch.randn(64, 48)
    generator = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    once = combine_deltas([delta], [1.0], "dare_linear", density=0.3, generator=generator(5))
    again = combine_deltas([delta], [1.0], "dare_linear", density=0.3, generator=generator(5))
    other = combine_deltas([delta], [1.0], "dare_linear", density=0.3, generator=generator(6))
    assert torch.equal(once, again) and not torch.equal(once, other)
    kept = once != 0
    assert torch.allclose(once[kept], delta[kept] / 0.3)  # kept entries are rescaled by 1 / density
    assert 0.2 < kept.float().mean() < 0.4
    # density 1 keeps everything: dare_linear is the weighted sum, dare_ties the sign-elected mean
    deltas = [torch.randn(8, 8), torch.randn(8, 8)]
    assert torch.allclose(combine_deltas(deltas, [0.5, 2.0], "dare_linear", density=1.0), 0.5 * deltas[0] + 2.0 * deltas[1])
    ties = combine_deltas(deltas, [1.0, 1.0], "dare_ties", density=1.0)
    agree = deltas[0].sign() == deltas[1].sign()
    assert torch.allclose(ties[agree], (deltas[0][agree] + deltas[1][agree]) / 2)


def test_dare_adapter_is_reproducible(two_adapters, tmp_path):
    for name, seed in [("d1", 3), ("d2", 3), ("d3", 4)]:
        combine_adapters(two_adapters, tmp_path / name, method="dare_ties", density=0.5, seed=seed, progress=False)
    first, second, third = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("d1", "d2", "d3"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], third[key]) for key in first)


def test_modules_to_save_and_rope_metadata_carried(tiny_llama, tmp_path):
    a0 = make_adapter(tiny_llama, tmp_path / "a0", seed=1, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    a1 = make_adapter(tiny_llama, tmp_path / "a1", seed=2, r=4, target_modules=["k_proj"], modules_to_save=["lm_head"])
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}
    write_metadata(a1, "lora-adapter", rope_parameters=rope, max_position_embeddings=1024)
    result = combine_adapters([a0, a1], tmp_path / "combined", method="cat", progress=False)
    assert result.modules_to_save == ["lm_head"] and any("lm_head" in w for w in result.warnings)
    assert read_metadata(tmp_path / "combined")["max_position_embeddings"] == 1024
    # the combined adapter merges like the two inputs (different modules: cat is exact)
    merge_adapters(tiny_llama, [a0, a1], tmp_path / "direct", progress=False)
    merge_adapters(tiny_llama, [tmp_path / "combined"], tmp_path / "via-combined", progress=False)
    assert_same_weights(load_merged(tmp_path / "via-combined"), load_merged(tmp_path / "direct"), tolerance=1e-6)
    # PEFT reads the per-module ranks (rank_pattern) and the saved lm_head of the combined adapter the same way
    assert_same_weights(peft_merge(tiny_llama, [tmp_path / "combined"]), load_merged(tmp_path / "direct"), tolerance=1e-6)
    assert json.loads((tmp_path / "via-combined" / "config.json").read_text())["max_position_embeddings"] == 1024


def test_combined_config_takes_the_most_common_rank(tiny_llama, tmp_path):
    """r is the rank most modules have, so rank_pattern lists only the others (as extract-lora's
    configs do); PEFT reads the per-module ranks back exactly."""
    from longctx.lora.adapter_format import rank_fields

    a0 = make_adapter(tiny_llama, tmp_path / "a0", seed=1, r=2, target_modules=["q_proj", "k_proj", "v_proj"])
    a1 = make_adapter(tiny_llama, tmp_path / "a1", seed=2, r=8, lora_alpha=4, target_modules=["o_proj"])
    combine_adapters([a0, a1], tmp_path / "cat", method="cat", progress=False)
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2
    o_proj = {f"model\\.layers\\.{i}\\.self_attn\\.o_proj": 8 for i in range(2)}
    assert config["rank_pattern"] == config["alpha_pattern"] == o_proj
    merge_adapters(tiny_llama, [a0, a1], tmp_path / "direct", progress=False)
    assert_same_weights(peft_merge(tiny_llama, [tmp_path / "cat"]), load_merged(tmp_path / "direct"), tolerance=1e-6)
    assert rank_fields({"a": 2, "b": 4})["r"] == 4  # a tie goes to the larger rank


def test_combine_errors_leave_nothing(two_adapters, tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "wider", hidden_size=32)
    wrong = make_adapter(other, tmp_path / "wrong", seed=3, r=2, target_modules=["q_proj"])
    with pytest.raises(LongctxError, match="adapters disagree on module"):
        combine_adapters([two_adapters[0], wrong], tmp_path / "out", method="svd", progress=False)
    with pytest.raises(LongctxError, match="--density"):
        combine_adapters(two_adapters, tmp_path / "out", method="ties", density=0, progress=False)
    with pytest.raises(LongctxError, match="unknown --combine method"):
        combine_adapters(two_adapters, tmp_path / "out", method="mean", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_cli_combine(two_adapters, tmp_path, capsys):
    from longctx.cli import main

    code = main(["merge-adapters", "--peft_model_paths", *map(str, two_adapters), "--combine", "svd", "--svd-rank", "3",
                 "--output_dir", str(tmp_path / "c")])
    assert code == 0
    assert "combined 2 adapter(s) with svd" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 3
