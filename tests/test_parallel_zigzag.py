"""Zigzag sharding, padding, batch sharding, the loss, backend choice and the transformers registration (one process)."""

import pytest
import torch
import torch.nn.functional as F

from longctx.errors import LongctxError
from longctx.parallel import (
    ATTENTION_NAME,
    pad_for_zigzag,
    ring_attention,
    sequence_parallel_loss,
    shard_for_sequence_parallel,
    zigzag_global_indices,
    zigzag_shard,
    zigzag_unshard,
)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_takes_chunks_r_and_mirror_and_unshard_restores(world_size):
    x = torch.arange(3 * 16 * 5).reshape(3, 16, 5)
    shards = [zigzag_shard(x, r, world_size) for r in range(world_size)]
    chunk = 16 // (2 * world_size)
    for rank, shard in enumerate(shards):
        expected = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                              torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk)])
        assert torch.equal(shard[0, :, 0], x[0, expected, 0])
        assert torch.equal(zigzag_global_indices(16 // world_size, rank, world_size), expected)
    assert torch.equal(zigzag_unshard(shards), x)


def test_shard_along_another_dim():
    x = torch.randn(2, 3, 8, 4)
    shards = [zigzag_shard(x, r, 2, dim=2) for r in range(2)]
    assert torch.equal(zigzag_unshard(shards, dim=2), x)


def test_shard_refuses_indivisible_length_and_bad_rank():
    with pytest.raises(LongctxError, match="pad_for_zigzag"):
        zigzag_shard(torch.zeros(1, 10), 0, 2)
    with pytest.raises(LongctxError, match="outside"):
        zigzag_shard(torch.zeros(1, 8), 2, 2)
    with pytest.raises(LongctxError, match="same even length"):
        zigzag_unshard([torch.zeros(1, 4), torch.zeros(1, 6)])


def test_pad_for_zigzag_pads_ids_labels_and_continues_positions():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = ids.clone()
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    padded_ids, padded_labels, padded_positions = pad_for_zigzag(ids, labels, positions, world_size=2, pad_token_id=3)
    assert padded_ids.tolist() == [[5, 6, 7, 8, 9, 3, 3, 3]]
    assert padded_labels.tolist() == [[5, 6, 7, 8, 9, -100, -100, -100]]
    assert padded_positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    same = pad_for_zigzag(padded_ids, padded_labels, padded_positions, world_size=2)
    assert same[0] is padded_ids
    _, none_labels, default_positions = pad_for_zigzag(ids, None, None, world_size=4)
    assert none_labels is None and default_positions.tolist() == [list(range(8))]


def test_shard_for_sequence_parallel_shifts_labels_over_the_whole_sequence():
    ids = torch.arange(16)[None] + 10
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "extra": "kept"}
    shards = [shard_for_sequence_parallel(batch, r, 2) for r in range(2)]
    assert shards[0]["extra"] == "kept" and "attention_mask" not in shards[0]
    for shard in shards:
        # every local token's target is the next token of the global sequence, also at chunk edges
        target = shard["input_ids"] + 1
        target[shard["input_ids"] == 25] = -100
        assert torch.equal(shard["shift_labels"], target)
        assert torch.equal(shard["position_ids"], shard["input_ids"] - 10)
    assert torch.equal(zigzag_unshard([s["input_ids"] for s in shards]), ids)


def test_shard_for_sequence_parallel_keeps_already_shifted_labels():
    """The training loop's batches carry labels shifted per document (-100 at each end): sharded unchanged."""
    ids = torch.arange(16)[None] + 10
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    targets = torch.cat([ids[:, 1:9], torch.tensor([[-100]]), ids[:, 10:], torch.tensor([[-100]])], dim=1)
    batch = {"input_ids": ids, "labels": targets, "position_ids": positions}
    shards = [shard_for_sequence_parallel(batch, r, 2, labels_shifted=True) for r in range(2)]
    assert torch.equal(zigzag_unshard([s["shift_labels"] for s in shards]), targets)
    assert torch.equal(zigzag_unshard([s["position_ids"] for s in shards]), positions)
    # a group of one keeps the batch whole, of any length
    odd = {"input_ids": ids[:, :15], "labels": targets[:, :15], "position_ids": positions[:, :15]}
    whole = shard_for_sequence_parallel(odd, 0, 1, labels_shifted=True)
    assert all(torch.equal(whole[k], odd[v]) for k, v in
               [("input_ids", "input_ids"), ("shift_labels", "labels"), ("position_ids", "position_ids")])


def test_shard_for_sequence_parallel_refuses_padding_mask_and_bad_lengths():
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(LongctxError, match="attention_mask"):
        shard_for_sequence_parallel({"input_ids": ids, "attention_mask": torch.tensor([[1] * 7 + [0]])}, 0, 2)
    with pytest.raises(LongctxError, match="pad_for_zigzag"):
        shard_for_sequence_parallel({"input_ids": torch.zeros(1, 6, dtype=torch.long)}, 0, 2)
    with pytest.raises(LongctxError, match="labels shape"):
        shard_for_sequence_parallel({"input_ids": ids, "labels": ids[:, :4]}, 0, 2)


def test_loss_is_the_mean_over_valid_tokens_without_a_group():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    loss = sequence_parallel_loss(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def _qkv(seed, batch=2, seq=24, heads=6, kv_heads=2, dim=16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shape = lambda h: (batch, seq, h, dim)  # noqa: E731
    return [torch.randn(shape(h), generator=generator, dtype=dtype).requires_grad_() for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("backend", ["auto", "torch", "torch-math"])
def test_single_process_is_plain_causal_attention(backend):
    q, k, v = _qkv(1)
    out = ring_attention(q, k, v, backend=backend)
    reference = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_ring_flash_attn_backend_needs_flash_attn_and_auto_picks_torch():
    from longctx.parallel import flash_attn_available
    from longctx.parallel.ring import _resolve_backend

    assert not flash_attn_available()
    q, k, v = _qkv(2)
    with pytest.raises(LongctxError, match="flash-attn"):
        ring_attention(q, k, v, backend="ring-flash-attn")
    assert _resolve_backend("auto", q, causal=True, packed=False, ring=True) == "torch"
    with pytest.raises(LongctxError, match="unknown ring attention backend"):
        ring_attention(q, k, v, backend="nccl")


def test_bad_local_shapes_are_refused():
    q, k, v = _qkv(3)
    packed = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with pytest.raises(LongctxError, match="causal attention only"):
        ring_attention(q, k, v, causal=False, position_ids=packed)
    with pytest.raises(LongctxError, match="do not match"):
        ring_attention(q, k[:, :20], v)
    with pytest.raises(LongctxError, match="multiple"):
        ring_attention(q[:, :, :5], k, v)


def _tiny_model(attn):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.set_attn_implementation(attn)
    return model


def test_registered_with_transformers_and_plain_in_one_process():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert ATTENTION_NAME == "longctx_ring"
    assert ATTENTION_NAME in AttentionInterface._global_mapping
    assert ATTENTION_NAME in AttentionMaskInterface._global_mapping
    model = _tiny_model("longctx_ring")
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    ring_logits = model(ids, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(ring_logits, model(ids, use_cache=False).logits, rtol=0, atol=1e-5)


def test_packed_documents_equal_separate_runs_in_one_process():
    model = _tiny_model("longctx_ring")
    ids = torch.randint(0, 259, (1, 32), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None]
    packed = model(ids, position_ids=positions, use_cache=False).logits
    separate = torch.cat([model(ids[:, :20], use_cache=False).logits, model(ids[:, 20:], use_cache=False).logits], 1)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)


def test_padding_attention_mask_is_refused_by_the_model():
    model = _tiny_model("longctx_ring")
    ids = torch.randint(0, 259, (1, 8))
    with pytest.raises(LongctxError, match="pad_for_zigzag"):
        model(ids, attention_mask=torch.tensor([[1] * 6 + [0, 0]]), use_cache=False)
    model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
