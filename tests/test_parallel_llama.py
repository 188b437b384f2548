"""A stock LlamaForCausalLM run sequence-parallel through attn_implementation="longctx_ring" equals one process."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.parallel import (
    pad_for_zigzag,
    sequence_parallel_loss,
    set_sequence_parallel_group,
    shard_for_sequence_parallel,
    shift_labels,
)
from test_parallel_ring import run_ranks


def _model():
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.set_attn_implementation("sdpa")
    return model


def _reference(model, input_ids, labels, documents):
    """Single-process loss (mean over valid tokens) and gradients; packed documents run one by one."""
    if documents is None:
        logits = model(input_ids, use_cache=False).logits
    else:
        pieces = input_ids.split(documents, dim=1)
        logits = torch.cat([model(piece, use_cache=False).logits for piece in pieces], dim=1)
    targets = shift_labels(labels)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), grads


def _check_llama(rank, world_size, batch, length, documents, group=None, seed=0):
    model = _model()
    generator = torch.Generator().manual_seed(length + seed)
    input_ids = torch.randint(3, 259, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = -100  # e.g. a prompt without loss
    positions = None if documents is None else torch.cat([torch.arange(n) for n in documents])[None]
    expected_loss, expected_grads = _reference(model, input_ids, labels, documents)

    input_ids, labels, positions = pad_for_zigzag(input_ids, labels, positions, world_size)
    shard = shard_for_sequence_parallel(
        {"input_ids": input_ids, "labels": labels, "position_ids": positions}, rank, world_size
    )
    model.set_attn_implementation("longctx_ring")
    logits = model(shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
    loss = sequence_parallel_loss(logits, shard["shift_labels"], group=group)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=1e-5)
    for name, parameter in model.named_parameters():
        grad = parameter.grad.clone()
        dist.all_reduce(grad, group=group)  # the sequence's gradient is the sum of the ranks' shares
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-5, msg=name)


def _check_all(rank, world_size):
    _check_llama(rank, world_size, batch=2, length=64, documents=None)
    _check_llama(rank, world_size, batch=2, length=61, documents=None)  # padded to 64
    _check_llama(rank, world_size, batch=1, length=64, documents=[37, 27])


def test_llama_forward_backward_two_ranks():
    run_ranks(2, _check_all)


def _check_bfloat16_autocast(rank, world_size):
    """Under bfloat16 autocast transformers' rope gives q, k in float32 beside a bfloat16 v; the ring runs
    them in bfloat16 as sdpa does, with sdpa's loss and gradients to bfloat16 accuracy."""
    model = _model()
    input_ids = torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected_grads = _reference(model, input_ids, input_ids, None)
        shard = shard_for_sequence_parallel({"input_ids": input_ids, "labels": input_ids}, rank, world_size)
        model.set_attn_implementation("longctx_ring")
        logits = model(shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
        loss = sequence_parallel_loss(logits.float(), shard["shift_labels"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=2e-2, atol=0)
    for name, parameter in model.named_parameters():
        grad = parameter.grad.clone()
        dist.all_reduce(grad)
        cosine = F.cosine_similarity(grad.flatten(), expected_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_llama_under_bfloat16_autocast_two_ranks():
    run_ranks(2, _check_bfloat16_autocast)


def _check_two_rings(rank, world_size):
    rings = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    set_sequence_parallel_group(rings[rank // 2])  # what longctx_ring rings over
    _check_llama(rank % 2, 2, batch=1, length=64, documents=[30, 34], group=rings[rank // 2], seed=rank // 2)


def test_llama_on_two_rings_of_two_ranks():
    run_ranks(4, _check_two_rings)



def _check_default_model(rank, world_size, model, input_ids, expected_loss, expected_grads):
    model.set_attn_implementation("longctx_ring")
    shard = shard_for_sequence_parallel({"input_ids": input_ids, "labels": input_ids}, rank, world_size)
    logits = model(shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
    loss = sequence_parallel_loss(logits, shard["shift_labels"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=1e-5)
    parameters = dict(model.named_parameters())
    for name, expected in expected_grads.items():
        grad = parameters[name].grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_default_model_loss_and_gradients_on_two_ranks(default_model_dir):
    """SmolLM2-135M (9 heads / 3 kv heads, 30 layers): 2 ranks equal one process (the forked ranks share its weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    input_ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(7))
    loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.q_proj.weight",
             "model.layers.15.mlp.down_proj.weight", "model.norm.weight"]
    parameters = dict(model.named_parameters())
    expected_grads = {name: parameters[name].grad.clone() for name in names}
    model.zero_grad(set_to_none=True)
    run_ranks(2, _check_default_model, model, input_ids, loss.detach(), expected_grads)
