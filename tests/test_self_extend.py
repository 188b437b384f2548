"""Grouped-position attention (Self-Extend): the math against a plain-PyTorch reference and SDPA, the
transformers implementation against one-pass prefill and model.generate, and its registration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from longctx.attention.self_extend import GroupedRotation, self_extend_attention
from tests.conftest import make_tiny_llama


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, d] rotated at `positions` [s], as transformers' apply_rotary_pos_emb does."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x = x.double()
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def reference_attention(q_raw, k_raw, v, inv_freq, group_size, window, scale):
    """Self-Extend written out in full from unrotated q/k: every (query, key) logit from exact positions
    inside the window and grouped positions beyond it, one causal softmax (float64)."""
    q_len, k_len = q_raw.shape[2], k_raw.shape[2]
    q_pos = torch.arange(k_len - q_len, k_len)
    k_pos = torch.arange(k_len)
    repeat = q_raw.shape[1] // k_raw.shape[1]
    k_raw, v = k_raw.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1).double()
    exact = rotate(q_raw, q_pos, inv_freq) @ rotate(k_raw, k_pos, inv_freq).transpose(-1, -2)
    grouped_q = rotate(q_raw, q_pos // group_size + window - window // group_size, inv_freq)
    grouped = grouped_q @ rotate(k_raw, k_pos // group_size, inv_freq).transpose(-1, -2)
    distance = q_pos[:, None] - k_pos[None, :]
    logits = torch.where(distance < window, exact, grouped) * scale
    logits = logits.masked_fill(distance < 0, float("-inf"))
    return torch.softmax(logits, -1) @ v


def random_problem(seed, q_len, k_len, heads=4, kv_heads=2, head_dim=16, rotary_pairs=8):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, q_len, head_dim, generator=generator)
    k, v = (torch.randn(1, kv_heads, k_len, head_dim, generator=generator) for _ in range(2))
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_pairs) / rotary_pairs))
    return q, k, v, inv_freq


def rotated_inputs(q, k, inv_freq):
    k_len, q_len = k.shape[2], q.shape[2]
    rotary = 2 * inv_freq.numel()

    def part(x, positions):
        return torch.cat((rotate(x[..., :rotary], positions, inv_freq).float(), x[..., rotary:]), -1)

    return part(q, torch.arange(k_len - q_len, k_len)), part(k, torch.arange(k_len))


@pytest.mark.parametrize(
    "q_len, k_len, group_size, window",
    [
        (40, 40, 3, 8),  # one pass, prompt beyond the window
        (1, 57, 4, 10),  # a decode step over a cache
        (13, 50, 2, 6),  # a chunk on top of a cache
        (20, 60, 5, 32),  # a chunk whose near band covers the start
        (7, 7, 3, 8),  # shorter than the window
    ],
)
def test_matches_the_reference(q_len, k_len, group_size, window):
    q, k, v, inv_freq = random_problem(q_len * 100 + k_len, q_len, k_len)
    scale = q.shape[-1] ** -0.5
    expected = reference_attention(q, k, v, inv_freq, group_size, window, scale)
    q_rot, k_rot = rotated_inputs(q, k, inv_freq)
    out = self_extend_attention(q_rot, k_rot, v, rotation=GroupedRotation(inv_freq, group_size, window), scale=scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_partial_rotary_dims_pass_through():
    """Only the first 2 * len(inv_freq) dims rotate (partial_rotary_factor), here half the head."""
    q, k, v, inv_freq = random_problem(7, 30, 30, rotary_pairs=4)
    q_rot, k_rot = rotated_inputs(q, k, inv_freq)
    scale = 0.25

    def reference(q_raw, k_raw):
        def rot(x, positions):
            return torch.cat((rotate(x[..., :8], positions, inv_freq), x[..., 8:].double()), -1)

        positions = torch.arange(30)
        kk, vv = k_raw.repeat_interleave(2, 1), v.repeat_interleave(2, 1).double()
        exact = rot(q_raw, positions) @ rot(kk, positions).transpose(-1, -2)
        grouped = rot(q_raw, positions // 3 + 8 - 8 // 3) @ rot(kk, positions // 3).transpose(-1, -2)
        distance = positions[:, None] - positions[None, :]
        logits = torch.where(distance < 8, exact, grouped).mul(scale).masked_fill(distance < 0, float("-inf"))
        return torch.softmax(logits, -1) @ vv

    out = self_extend_attention(q_rot, k_rot, v, rotation=GroupedRotation(inv_freq, 3, 8), scale=scale)
    torch.testing.assert_close(out.double(), reference(q, k), atol=2e-5, rtol=1e-4)


def test_equals_sdpa_inside_the_window_and_differs_beyond_it():
    q, k, v, inv_freq = random_problem(3, 24, 24)
    q_rot, k_rot = rotated_inputs(q, k, inv_freq)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, enable_gqa=True)
    inside = self_extend_attention(q_rot, k_rot, v, rotation=GroupedRotation(inv_freq, 4, 24), scale=0.25)
    torch.testing.assert_close(inside, sdpa, atol=1e-5, rtol=1e-5)
    beyond = self_extend_attention(q_rot, k_rot, v, rotation=GroupedRotation(inv_freq, 4, 6), scale=0.25)
    assert (beyond - sdpa).abs().max() > 1e-2  # the negative control: grouping changes the result


def test_gradients_match_the_reference():
    q, k, v, inv_freq = random_problem(11, 30, 30)
    q_rot, k_rot = rotated_inputs(q, k, inv_freq)
    q_rot.requires_grad_(True)
    out = self_extend_attention(q_rot, k_rot, v, rotation=GroupedRotation(inv_freq, 3, 8), scale=0.25)
    out.square().sum().backward()
    q_ref = q.clone().double().requires_grad_(True)
    reference_attention(q_ref, k, v, inv_freq, 3, 8, 0.25).square().sum().backward()
    # d/dq_rot = R(-p) d/dq_raw: rotate the reference gradient back to the rotated frame
    expected = rotate(q_ref.grad, torch.arange(30), inv_freq)
    torch.testing.assert_close(q_rot.grad.double(), expected, atol=1e-4, rtol=1e-3)


# --- the transformers implementation ---------------------------------------------------------------

SETTINGS = {"group_size": 3, "window": 16}


@pytest.fixture
def self_extend_llama(tmp_path):
    path = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=64)
    config = json.loads((path / "config.json").read_text())
    config["self_extend"] = SETTINGS
    (path / "config.json").write_text(json.dumps(config))
    return path


def load(path, implementation="longctx_self_extend"):
    import longctx  # noqa: F401  (registers the implementation)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation).eval()


@torch.no_grad()
def test_model_one_pass_chunked_prefill_and_decode_agree(self_extend_llama):
    from longctx.eval.cache import cache_keyword
    from longctx.eval.engine import new_cache, prefill

    model = load(self_extend_llama)
    ids = torch.randint(3, 259, (1, 150), generator=torch.Generator().manual_seed(0))
    one_pass = model(input_ids=ids).logits[0]
    cache = new_cache()
    chunked = [model(input_ids=ids[:, s : s + 37], use_cache=True, **{cache_keyword(model): cache}).logits[0] for s in range(0, 150, 37)]
    torch.testing.assert_close(torch.cat(chunked), one_pass, atol=1e-4, rtol=1e-4)
    cache = new_cache()
    last = prefill(model, cache, ids[0, :-5].tolist(), chunk_size=32, keep=1)
    stepwise = [last[0]]
    for token in ids[0, -5:].tolist():
        stepwise.append(model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_keyword(model): cache}).logits[0, -1])
    torch.testing.assert_close(torch.stack(stepwise), one_pass[-6:], atol=1e-4, rtol=1e-4)
    sdpa = load(self_extend_llama, "sdpa")(input_ids=ids).logits[0]
    assert (sdpa[-50:] - one_pass[-50:]).abs().max() > 1e-3  # grouping is on beyond the window
    torch.testing.assert_close(sdpa[:16], one_pass[:16], atol=1e-4, rtol=1e-4)  # and off inside it


@torch.no_grad()
def test_engine_answer_equals_generate(self_extend_llama):
    """The needle engine's greedy answer (chunked prefill, drafts, prefix reuse) is model.generate's."""
    from longctx.eval.engine import PrefixCache, greedy_answer
    from tests.conftest import make_tokenizer

    model, tokenizer = load(self_extend_llama), make_tokenizer()
    ids = torch.randint(3, 259, (1, 120), generator=torch.Generator().manual_seed(1))
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)[0, 120:].tolist()
    expected = tokenizer.decode(generated, skip_special_tokens=True).lstrip().split("\n")[0].strip()
    prefix = PrefixCache(model, ids[0, :90].tolist(), chunk_size=32)
    for draft in ([], generated[:3], [7, 8, 9]):
        answer = greedy_answer(model, tokenizer, prefix, ids[0].tolist(), 90, 8, draft=draft)
        assert answer.text == expected


def test_refuses_a_padding_mask_and_length_dependent_rope(tmp_path, self_extend_llama):
    from longctx.errors import LongctxError

    model = load(self_extend_llama)
    ids = torch.randint(3, 259, (1, 20))
    with pytest.raises(LongctxError, match="padding"):
        model(input_ids=ids, attention_mask=torch.cat((torch.zeros(1, 2), torch.ones(1, 18)), 1).long())
    dynamic = make_tiny_llama(tmp_path / "dynamic", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    config = json.loads((dynamic / "config.json").read_text())
    config["self_extend"] = SETTINGS
    (dynamic / "config.json").write_text(json.dumps(config))
    with pytest.raises(LongctxError, match="static rope"):
        load(dynamic)(input_ids=ids)


@pytest.mark.parametrize("first", ["longctx", "transformers"])
def test_import_longctx_registers_it_in_either_order(first):
    imports = ["import longctx", "import transformers.modeling_utils"]
    if first == "transformers":
        imports.reverse()
    code = "; ".join(imports) + (
        "; import sys; from transformers import AttentionInterface; "
        "print('longctx_self_extend' in AttentionInterface._global_mapping)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_import_longctx_imports_neither_torch_nor_transformers():
    code = "import longctx, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


# --- the planner, `extend`, and the loaders ---------------------------------------------------------


@pytest.mark.parametrize(
    "native, target, given, expected",
    [
        (8192, 16384, {}, {"group_size": 3, "window": 1024}),  # (8192 - 1024) * 3 + 1024 = 22528 >= 16K; 2 is short
        (8192, 32768, {}, {"group_size": 5, "window": 1024}),
        (8192, 32768, {"window": 2048}, {"group_size": 5, "window": 2048}),  # exactly 32768
        (4096, 16384, {"group_size": 8, "window": 1024}, {"group_size": 8, "window": 1024}),  # LongLM's Llama-2 setting
    ],
)
def test_planner_takes_the_smallest_group_that_reaches_the_target(native, target, given, expected):
    from longctx.rope.self_extend import reach, self_extend_for_length

    settings = self_extend_for_length(native, target, **given)
    assert settings == expected
    assert reach(native, settings["group_size"], settings["window"]) >= target
    if "group_size" not in given:
        assert reach(native, settings["group_size"] - 1, settings["window"]) < target


def test_extend_writes_self_extend_that_our_loader_and_transformers_run(tmp_path, capsys):
    from longctx.cli import main
    from longctx.models import load_model_and_tokenizer
    from longctx.models.metadata import read_metadata

    source = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=64)
    out = tmp_path / "se"
    assert main(["extend", "--model", str(source), "--target-len", "200", "--method", "ntk", "--self-extend",
                 "--window", "16", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["self_extend"] == {"group_size": 4, "window": 16}  # (64 - 16) * 4 + 16 = 208 >= 200
    assert read_metadata(out)["self_extend"] == config["self_extend"]
    assert config["rope_parameters"]["rope_theta"] > 10000.0  # ntk underneath
    model, _ = load_model_and_tokenizer(out)
    assert model.config._attn_implementation == "longctx_self_extend"
    ids = torch.randint(3, 259, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        sdpa = load(out, "sdpa")(input_ids=ids).logits
    assert (ours - sdpa).abs().max() > 1e-3  # the loader really switched attention
    assert "longctx_self_extend" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "self-extend", "--factor", "2"], "does not apply to method self-extend"),
        (["--method", "self-extend", "--self-extend"], "drop it"),
        (["--group-size", "3"], "add --self-extend"),
        (["--method", "self-extend", "--group-size", "2", "--window", "16"], "reaches only 112"),
        (["--method", "self-extend", "--window", "64"], "--window 64 must be between"),
        (["--method", "dynamic", "--self-extend"], "needs a static rope"),
    ],
)
def test_extend_refuses_bad_self_extend_requests(tmp_path, capsys, flags, message):
    from longctx.cli import main

    source = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=64)
    out = tmp_path / "se"
    assert main(["extend", "--model", str(source), "--target-len", "200", *flags, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_extend_train_refuses_sequence_parallel_with_self_extend_before_writing(tmp_path, capsys, monkeypatch):
    import yaml

    from longctx.cli import main

    source = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=64)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to train on\n" * 20)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"parallel": {"sequence_parallel": 2}, "data": {"source": "files", "paths": [str(corpus)]},
                                      "stages": [{"seq_len": 128, "steps": 1, "learning_rate": 1e-4}]}))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, so the world check passes
    out = tmp_path / "se"
    assert main(["extend", "--model", str(source), "--target-len", "200", "--method", "ntk", "--self-extend",
                 "--output", str(out), "--train", str(config)]) == 2
    assert "cannot be sharded by sequence parallelism" in capsys.readouterr().err
    assert not out.exists()
