"""Shared fixtures: tiny random Llama models (with a byte-level tokenizer) built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {token: i for i, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({token: len(specials) + i for i, token in enumerate(sorted(byte_vocab))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def make_tiny_llama(path: str | Path, *, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
    """Save a random tiny LlamaForCausalLM (and tokenizer) with save_pretrained; returns the path."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(path)
    return Path(path)


def without_config_key(model_dir: Path, dest: Path, key: str) -> Path:
    """dest: model_dir's weights (symlinked) with `key` removed from its config.json."""
    import json

    dest.mkdir()
    (dest / "model.safetensors").symlink_to(Path(model_dir) / "model.safetensors")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    del config[key]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, converted once into the cache (about 30 s the first time)."""
    from longctx.models import resolve_model

    return resolve_model("smollm2-135m")
