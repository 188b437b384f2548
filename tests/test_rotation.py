"""Length-dependent rope (dynamic NTK, LongRoPE) in the evaluation engine rotates as transformers'
own one-pass forward and `generate` do, whatever the chunking and whatever ran before."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from longctx.eval.engine import PrefixCache, greedy_answer, new_cache, prefill, teacher_forced_answer
from longctx.eval.perplexity import perplexity_by_length
from longctx.eval.rotation import rotation_for_length
from tests.conftest import make_tiny_llama, make_tokenizer

NATIVE = 64
ROPES = {
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "longrope": {
        "rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": NATIVE,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)],
    },
}


@pytest.fixture(params=sorted(ROPES))
def fresh(request, tmp_path):
    """A function giving an untouched copy of a tiny model with length-dependent rope."""
    from transformers import AutoModelForCausalLM

    max_positions = NATIVE if request.param == "dynamic" else 4 * NATIVE
    path = make_tiny_llama(tmp_path / request.param, max_position_embeddings=max_positions,
                           rope_parameters=ROPES[request.param], initializer_range=0.1)  # outputs that depend on position
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return lambda: copy.deepcopy(model)


def prompt(seed, length):
    return torch.randint(3, 259, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_chunked_prefill_rotates_as_one_pass(fresh):
    ids = prompt(0, 150)
    one_pass = fresh()(input_ids=torch.tensor([ids])).logits[0, -1]
    model = fresh()
    model(input_ids=torch.tensor([prompt(1, 230)]))  # an earlier, longer pass leaves its state behind
    with rotation_for_length(model, len(ids)):
        held = prefill(model, new_cache(), ids, chunk_size=32, keep=1)[0]
    torch.testing.assert_close(held, one_pass, atol=1e-4, rtol=1e-4)
    unheld = prefill(fresh(), new_cache(), ids, chunk_size=32, keep=1)[0]
    assert (unheld - one_pass).abs().max() > 1e-3  # the negative control: chunks rotated by their own lengths


@torch.no_grad()
def test_greedy_answers_equal_generate_in_any_order(fresh):
    model, tokenizer = fresh(), make_tokenizer()
    for ids in (prompt(2, 200), prompt(3, 90), prompt(4, 40)):  # longer, then shorter, then below native
        expected = fresh().generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        text = tokenizer.decode(expected, skip_special_tokens=True).lstrip().split("\n")[0].strip()
        prefix = PrefixCache(model, ids, enabled=False, chunk_size=32)
        assert greedy_answer(model, tokenizer, prefix, ids, 0, 6).text == text


@torch.no_grad()
def test_teacher_forcing_rotates_as_one_pass_over_prompt_and_answer(fresh):
    ids, answer = prompt(5, 170), prompt(6, 16)
    logits = fresh()(input_ids=torch.tensor([ids + answer[:-1]])).logits[0, -len(answer):]
    predicted = logits.argmax(-1).tolist()
    model, tokenizer = fresh(), make_tokenizer()
    result = teacher_forced_answer(model, tokenizer, PrefixCache(model, ids, enabled=False, chunk_size=32),
                                   ids, 0, [[token] for token in answer])
    assert result.text == tokenizer.decode(predicted, skip_special_tokens=True).strip()
    assert result.parts_right == [p == a for p, a in zip(predicted, answer)]


@torch.no_grad()
def test_perplexity_per_length_equals_one_forward_pass(fresh):
    ids = prompt(7, 220)
    lengths = [50, 120, 220]
    got = perplexity_by_length(fresh(), ids, lengths, chunk_size=32)
    for L in lengths:
        logits = fresh()(input_ids=torch.tensor([ids[:L]])).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:L]))
        assert math.isclose(got[L], math.exp(loss.item()), rel_tol=1e-4)
