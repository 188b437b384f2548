"""DeepSpeed-Ulysses and the Ulysses x ring hybrid on 2 and 4 forked gloo ranks equal one process:
attention outputs and q/k/v gradients against SDPA (GQA with fewer KV heads than Ulysses ranks,
packed documents), a stock LlamaForCausalLM's loss and parameter gradients through
attn_implementation="longctx_ring", a packed training step, and a `longctx train` run per mode."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import make_tiny_llama
from test_parallel_ring import gather_unshard, reference_attention, run_ranks

from longctx.errors import LongctxError
from longctx.parallel import (
    SequenceParallelGroups,
    new_sequence_parallel_groups,
    set_sequence_parallel_groups,
    ulysses_attention,
    zigzag_shard,
    zigzag_unshard,
)
from longctx.parallel.groups import sequence_parallel_layout
from longctx.parallel.transformers_attention import longctx_ring_attention_forward
from longctx.parallel.ulysses import kv_head_repeats

# (seq, heads, kv_heads, head_dim, dtype, causal, documents)
CASES = [
    (64, 8, 8, 16, torch.float32, True, None),
    (64, 8, 2, 16, torch.float32, True, None),  # with U = 4: fewer KV heads than ranks, each repeated twice
    (48, 4, 1, 32, torch.float32, True, None),  # one KV head, repeated U times
    (96, 12, 3, 16, torch.float32, True, [40, 33, 23]),  # packed; 3 KV heads, repeated 2 (U = 2) or 4 (U = 4) times
    (64, 8, 2, 16, torch.float32, False, None),
    (64, 8, 4, 16, torch.bfloat16, True, [24, 40]),
]


class _Attention(torch.nn.Module):
    is_causal = True


def _positions(documents):
    return torch.cat([torch.arange(n) for n in documents])[None]


def _check_cases(rank, world_size, ulysses, cases):
    """Through the transformers attention function (what a model calls), with the groups set for U."""
    set_sequence_parallel_groups(new_sequence_parallel_groups(world_size, ulysses))
    for seq, heads, kv_heads, dim, dtype, causal, documents in cases:
        generator = torch.Generator().manual_seed(seq * 100 + heads + kv_heads)
        q, k, v = (torch.randn(2, seq, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
        grad_out = torch.randn(2, seq, heads, dim, generator=generator)
        full = [t.to(dtype).float().clone().requires_grad_() for t in (q, k, v)]
        expected = reference_attention(*full, causal=causal, documents=documents)
        expected.backward(grad_out)

        local = [zigzag_shard(t.to(dtype), rank, world_size).requires_grad_() for t in (q, k, v)]
        position_ids = None if documents is None else zigzag_shard(_positions(documents), rank, world_size)
        out, _ = longctx_ring_attention_forward(_Attention(), *(t.transpose(1, 2) for t in local), None,
                                                is_causal=causal, position_ids=position_ids)
        out.backward(zigzag_shard(grad_out.to(dtype), rank, world_size))

        tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        label = f"P={world_size} U={ulysses} seq={seq} heads={heads}/{kv_heads} {dtype} causal={causal} docs={documents}"
        assert out.dtype == dtype and out.shape == local[0].shape, label
        torch.testing.assert_close(gather_unshard(out, world_size).float(), expected, rtol=0, atol=tolerance, msg=label)
        for tensor, name, full_tensor in zip(local, "qkv", full):
            torch.testing.assert_close(gather_unshard(tensor.grad, world_size).float(), full_tensor.grad,
                                       rtol=0, atol=tolerance * 2, msg=f"d{name} {label}")


@pytest.mark.parametrize("world_size, ulysses", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)])
def test_attention_equals_sdpa(world_size, ulysses):
    run_ranks(world_size, _check_cases, ulysses, CASES)


def test_packed_cases_would_fail_across_documents():
    """The packed cases are sensitive: attending across documents is far outside the tolerance."""
    for seq, heads, kv_heads, dim, _, causal, documents in CASES:
        if documents is None:
            continue
        generator = torch.Generator().manual_seed(seq * 100 + heads + kv_heads)
        q, k, v = (torch.randn(2, seq, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
        apart, across = reference_attention(q, k, v, causal, documents), reference_attention(q, k, v, causal)
        assert (apart - across).abs().max() > 0.1


@pytest.mark.parametrize("kv_heads, ulysses, repeats", [(8, 4, 1), (8, 16, 2), (2, 4, 2), (1, 4, 4), (3, 2, 2),
                                                        (3, 4, 4), (6, 4, 2)])
def test_kv_head_repeats_give_whole_kv_heads(kv_heads, ulysses, repeats):
    assert kv_head_repeats(kv_heads, ulysses) == repeats
    assert kv_heads * repeats % ulysses == 0


@pytest.mark.parametrize("sequence_parallel, ulysses", [(2, 2), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4)])
def test_a_ulysses_group_gathers_its_ring_ranks_zigzag_shard(sequence_parallel, ulysses):
    """The layout the hybrid rests on: the group's P-way zigzag shards, zigzag_unshard-ed, are the R-way
    zigzag shard of its ring rank, so the ring across the groups is causal-balanced."""
    sequence = torch.arange(4 * sequence_parallel)[None]
    ulysses_groups, rings = sequence_parallel_layout(sequence_parallel, sequence_parallel, ulysses)
    ring_size = sequence_parallel // ulysses
    assert len(ulysses_groups) == ring_size and len(rings) == ulysses
    for group in ulysses_groups:
        ring_rank = rings[0].index(group[0])
        assert all(rings[r % ulysses].index(r) == ring_rank for r in group)  # every member is that ring rank
        gathered = zigzag_unshard([zigzag_shard(sequence, r, sequence_parallel) for r in group])
        assert torch.equal(gathered, zigzag_shard(sequence, ring_rank, ring_size))


def test_layout_of_groups_and_rings():
    ulysses_groups, rings = sequence_parallel_layout(8, 4, 2)  # two data-parallel replicas of P = 4, U = 2
    assert ulysses_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rings == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sequence_parallel_layout(4, 4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert sequence_parallel_layout(4, 4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    with pytest.raises(LongctxError, match="Ulysses degree must divide"):
        sequence_parallel_layout(4, 4, 3)


def _check_errors(rank, world_size):
    groups = new_sequence_parallel_groups(world_size, 4)
    # 6 query heads cannot be split over 4 ranks: every rank gets the same one-line error
    with pytest.raises(LongctxError, match="6 query heads cannot be split over parallel.ulysses 4"):
        ulysses_attention(*(torch.randn(1, 8, h, 8) for h in (6, 2, 2)), group=groups.ulysses)
    seq = 8 if rank == 0 else 12
    with pytest.raises(LongctxError, match="Ulysses shapes differ across ranks"):
        ulysses_attention(*(torch.randn(1, seq, 4, 8) for _ in range(3)), group=groups.ulysses)
    with pytest.raises(LongctxError, match="is odd"):
        ulysses_attention(*(torch.randn(1, 7, 4, 8) for _ in range(3)), group=groups.ulysses)
    # groups that are not the layout (a Ulysses group of ranks 0 and 2, rings of consecutive ranks)
    strided, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    consecutive, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    with pytest.raises(LongctxError, match="new_sequence_parallel_groups"):
        ulysses_attention(*(torch.randn(1, 8, 4, 8) for _ in range(3)), group=strided, ring_group=consecutive)
    # nothing was left in flight: the hybrid still works
    _check_cases(rank, world_size, 2, CASES[1:2])


def test_errors_are_one_line_on_every_rank():
    run_ranks(4, _check_errors)


# --- a stock LlamaForCausalLM: loss and every parameter gradient equal one process's ----------------


def _check_llama(rank, world_size, ulysses):
    from test_parallel_llama import _check_bfloat16_autocast
    from test_parallel_llama import _check_llama as check

    set_sequence_parallel_groups(new_sequence_parallel_groups(world_size, ulysses))
    try:  # the tiny Llama has 4 query heads and 2 KV heads: with U = 4 each KV head is repeated twice
        check(rank, world_size, batch=2, length=64, documents=None)
        check(rank, world_size, batch=2, length=59, documents=None)  # padded to 64
        check(rank, world_size, batch=1, length=64, documents=[37, 27])
        _check_bfloat16_autocast(rank, world_size)  # q, k in float32 beside a bfloat16 v, as under training
    finally:
        set_sequence_parallel_groups(SequenceParallelGroups())


@pytest.mark.parametrize("world_size, ulysses", [(2, 2), (4, 2), (4, 4)])
def test_llama_loss_and_gradients(world_size, ulysses):
    run_ranks(world_size, _check_llama, ulysses)


def _packed_step(rank, world_size, ulysses, model_dir, batch, expected_loss, expected_grads):
    from test_train_distributed import assert_update_is, one_training_step

    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets; setup_runtime reads it
    loss, update = one_training_step(model_dir, batch, sequence_parallel=world_size, ulysses=ulysses)
    if rank == 0:
        assert_update_is(update, expected_loss, expected_grads, loss)


def test_packed_documents_stay_apart_in_a_training_step(tmp_path):
    """longctx's own step (FSDP2 + Ulysses, and the hybrid) equals the documents trained one by one;
    attending across them would be far outside the tolerance (the reference's negative control)."""
    from test_train_distributed import packed_batch, reference_gradients

    model_dir = make_tiny_llama(tmp_path / "tiny", initializer_range=0.2)
    batch = packed_batch()
    expected_loss, expected_grads = reference_gradients(model_dir, batch)
    _, crossing_grads = reference_gradients(model_dir, batch, across_documents=True)
    assert max((crossing_grads[n] - g).abs().max().item() for n, g in expected_grads.items()) > 1e-3
    run_ranks(2, _packed_step, 2, model_dir, batch, expected_loss, expected_grads)
    run_ranks(4, _packed_step, 2, model_dir, batch, expected_loss, expected_grads)


# --- `longctx train` (its API, as torchrun's ranks run it): one run per mode against one process ----------


def _train_config(directory, model, corpus, sequence_parallel, ulysses):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model), "output": str(directory / "out"), "seed": 3, "loss_chunk_size": 64,
        "parallel": {"sequence_parallel": sequence_parallel, "ulysses": ulysses},
        "data": {"source": "files", "paths": [str(corpus)]},
        "stages": [{"seq_len": 128, "steps": 2, "learning_rate": 3e-3}],
    }))
    return path


def _train(rank, world_size, config):
    from longctx.train.api import train_from_config

    os.environ["WORLD_SIZE"] = str(world_size)
    train_from_config(config, progress=False)


def _losses(directory):
    from longctx.train.checkpoint import read_metrics

    return [m["loss"] for m in read_metrics(directory / "out-checkpoints" / "metrics.jsonl") if "loss" in m]


def test_train_runs_ulysses_and_the_hybrid_as_one_process(tmp_path):
    from safetensors.torch import load_file

    from longctx.train.api import train_from_config

    model = make_tiny_llama(tmp_path / "tiny")
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(f"Line {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 4 + 1)
                                for i in range(40)))
    train_from_config(_train_config(tmp_path / "one", model, corpus, 1, 1), progress=False)
    one = _losses(tmp_path / "one")
    weights = load_file(tmp_path / "one" / "out" / "model.safetensors")
    for name, world_size, ulysses in [("ulysses", 2, 2), ("hybrid", 4, 2)]:
        run_ranks(world_size, _train, _train_config(tmp_path / name, model, corpus, world_size, ulysses))
        assert len(_losses(tmp_path / name)) == len(one) == 2, name
        torch.testing.assert_close(torch.tensor(_losses(tmp_path / name)), torch.tensor(one), rtol=1e-5, atol=1e-5)
        trained = load_file(tmp_path / name / "out" / "model.safetensors")
        for key in weights:
            torch.testing.assert_close(trained[key], weights[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        metadata = json.loads((tmp_path / name / "out" / "longctx.json").read_text())
        assert (metadata["sequence_parallel"], metadata["ulysses"]) == (world_size, ulysses)


# --- configs that cannot work are refused before any work -----------------------------------------------


def test_config_refuses_a_ulysses_degree_that_does_not_divide_sequence_parallel():
    from longctx.train.config import parse_config

    stage = [{"seq_len": 128, "steps": 1, "learning_rate": 1e-4}]
    for ulysses in (3, 0):
        with pytest.raises(LongctxError, match=f"parallel.ulysses {ulysses} does not divide sequence_parallel 4"):
            parse_config({"model": "m", "stages": stage, "parallel": {"sequence_parallel": 4, "ulysses": ulysses}})
    assert parse_config({"model": "m", "stages": stage}).parallel.ulysses == 1


def test_train_and_extend_refuse_heads_that_ulysses_cannot_split_before_writing(tmp_path, capsys, monkeypatch):
    from longctx.cli import main

    model = make_tiny_llama(tmp_path / "tiny", hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to train on\n" * 20)
    config = _train_config(tmp_path / "run", model, corpus, 4, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # as under torchrun, so the world check passes
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("longctx: error:") and "has 6 query heads, which parallel.ulysses 4 cannot split" in err
    out = tmp_path / "extended"
    assert main(["extend", "--model", str(model), "--target-len", "512", "--method", "ntk",
                 "--output", str(out), "--train", str(config)]) == 2
    assert "has 6 query heads" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no output, no checkpoints
