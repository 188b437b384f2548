"""Chunked cross-entropy: the plain loss and gradients, without full logits."""

import pytest
import torch
from torch import nn

from longctx.train.loss import CausalLMLoss, chunked_cross_entropy, plain_cross_entropy


def _case(seed=0, batch=2, seq=37, hidden=16, vocab=50, ignored=0.3):
    torch.manual_seed(seed)
    h = torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(hidden, vocab, bias=False).double()
    labels = torch.randint(0, vocab, (batch, seq))
    labels[torch.rand(batch, seq) < ignored] = -100
    return h, head, labels


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_chunked_equals_plain_in_value_and_gradients(chunk):
    h, head, labels = _case()
    plain_sum, plain_count = plain_cross_entropy(h, head, labels)
    plain_grads = torch.autograd.grad(plain_sum / plain_count, [h, head.weight])
    chunked_sum, chunked_count = chunked_cross_entropy(h, head, labels, chunk)
    chunked_grads = torch.autograd.grad(chunked_sum / chunked_count, [h, head.weight])
    assert int(chunked_count) == int(plain_count) == int((labels != -100).sum())
    torch.testing.assert_close(chunked_sum, plain_sum, rtol=1e-12, atol=1e-12)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_valid_token_gives_zero_loss_that_still_backpropagates():
    h, head, labels = _case()
    labels[:] = -100
    loss_sum, count = chunked_cross_entropy(h, head, labels, 8)
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and int(count) == 0 and h.grad is not None and float(h.grad.abs().sum()) == 0.0


def test_backward_never_holds_full_logits():
    """Peak saved activations stay at one chunk of logits: count the saved tensors' elements."""
    h, head, labels = _case(seq=400, vocab=500, ignored=0.0)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, _ = chunked_cross_entropy(h, head, labels, 32)
    assert max(saved) < 2 * 400 * 500 / 4  # far below [800, 500] logits; the plain loss saves them whole
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain_cross_entropy(h, head, labels)
    assert max(saved) >= 2 * 400 * 500


def test_causal_lm_loss_matches_transformers_own_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    input_ids = torch.randint(3, 259, (2, 48))
    hf_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    shifted = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    positions = torch.arange(48).expand(2, 48)
    for chunk in (0, 7):
        loss_sum, count = CausalLMLoss(model, chunk)(input_ids=input_ids, position_ids=positions, labels=shifted)
        torch.testing.assert_close(loss_sum / count, hf_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_default_model_chunked_loss_and_rope_rebuild(default_model_dir):
    """SmolLM2-135M (tied embeddings): the chunked loss equals transformers' own, and set_rope gives
    the logits of a model loaded with those rope settings in its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.rope import rope_for_length
    from longctx.train.loop import set_rope

    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 128))
    shifted = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    positions = torch.arange(128).unsqueeze(0)
    with torch.no_grad():
        hf_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss_sum, count = CausalLMLoss(model, 32)(input_ids=input_ids, position_ids=positions, labels=shifted)
    torch.testing.assert_close(loss_sum / count, hf_loss, rtol=1e-5, atol=1e-5)

    rope = rope_for_length(model.config.to_dict(), 32768, "yarn")
    set_rope(model, rope)
    config = AutoConfig.from_pretrained(default_model_dir)
    config.rope_parameters, config.max_position_embeddings = rope["rope_parameters"], rope["max_position_embeddings"]
    fresh = AutoModelForCausalLM.from_pretrained(default_model_dir, config=config)
    with torch.no_grad():
        ours = model(input_ids=input_ids, use_cache=False).logits
        theirs = fresh(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert model.model.rotary_emb.attention_scaling == fresh.model.rotary_emb.attention_scaling != 1.0
