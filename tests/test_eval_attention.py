"""`longctx_cached` attention: the same logits as sdpa for prompts run on top of a KV cache."""

import pytest
import torch
from conftest import tiny_llama_config

from longctx.eval.attention import ATTENTION_NAME, attention_after_cache, cached_attention
from longctx.eval.engine import new_cache, prefill


@pytest.mark.parametrize("query_len, past, kv_heads", [(7, 0, 2), (5, 11, 2), (1, 9, 1), (6, 6, 4)])
def test_attention_after_cache_is_causal_attention_aligned_to_the_last_key(query_len, past, kv_heads):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, query_len, 8, generator=generator)
    key, value = (torch.randn(2, kv_heads, past + query_len, 8, generator=generator) for _ in range(2))
    allowed = torch.ones(query_len, past + query_len, dtype=torch.bool).tril(past)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, enable_gqa=True)
    assert torch.allclose(attention_after_cache(query, key, value, 8 ** -0.5), expected, atol=1e-5)


def _chunked_logits(model, ids, chunk_size):
    cache = new_cache()
    logits = [prefill(model, cache, ids[start:start + chunk_size], keep=len(ids[start:start + chunk_size]))
              for start in range(0, len(ids), chunk_size)]
    return torch.cat(logits)


def _sliding_window_config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, sliding_window=8)


@pytest.mark.parametrize("make_config", [tiny_llama_config, _sliding_window_config])
def test_cached_attention_gives_sdpa_logits_in_a_model_and_restores_sdpa(make_config):
    """Plain causal models take the split path; a sliding window gets sdpa's mask and its result."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = make_config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = _chunked_logits(model, ids, 16)
    seen = []
    with cached_attention(model):
        seen.append(model.config._attn_implementation)
        got = _chunked_logits(model, ids, 16)
    assert seen == [ATTENTION_NAME] and model.config._attn_implementation == "sdpa"
    assert torch.allclose(got, expected, atol=1e-4)
