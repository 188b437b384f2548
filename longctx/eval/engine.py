"""Model-side work of an evaluation: chunked prefill, prefix KV reuse, greedy answers, teacher forcing.

Prefix reuse: every prompt of a run starts with the same tokens (template head + haystack)
up to its first needle. `PrefixCache` computes the KV cache of those clean tokens once,
growing it on demand, and hands each prompt a cache that starts with its shared prefix, so only
the rest of the prompt (needle onwards) is processed. Under `longctx_cached` attention (a CPU
sdpa model: the default) the prompt reads the prefix in place, its attention taking the prefix
as a block of its own (eval/cache.py's `continued_cache`); under any other attention it gets a
copy of the prefix (`cropped_copy`), which holds the prefix's memory twice. With static RoPE scaling a key's
rotation depends only on its position, so this is exact. With dynamic NTK the rotation
base depends on the length of the whole forward pass, so a cache built at one length is
wrong at another: reuse is refused and every prompt is prefilled from scratch, its chunks
rotated as transformers' one-pass prefill would rotate them (eval/rotation.py).

Greedy answers take the expected answer as a draft verified in the prompt's own pass
(`greedy_answer`), so a right answer costs no decode step.

With a `Sharding` (eval/sharded.py), every cache the engine makes is split across the ranks of a
process group, and each forward pass runs across them: the same calls, the same answers.

Inside `evaluation_mode`, an sdpa model attends with `longctx_cached` (eval/attention.py): a
chunk run on top of a cache needs no [chunk, cache + chunk] mask, which makes a suffix after
a reused prefix (and every chunk after the first) 12-30% cheaper on the CPU
(benchmarks/eval_engine.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from longctx.errors import LongctxError
from longctx.eval.attention import ATTENTION_NAME as CACHED_ATTENTION
from longctx.eval.attention import BASE_KEYWORD, cached_attention, takes_cached_attention
from longctx.eval.cache import cache_keyword, continued_cache, cropped_copy, is_based, keep_heap_small, new_cache
from longctx.eval.sharded import Sharding, is_sharded, sharded_attention
from longctx.eval.rotation import rotation_for_length
from longctx.rope.config import rope_types
from longctx.rope.methods import LENGTH_DEPENDENT_TYPES

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048


def length_dependent_rope(config) -> list[str]:
    """The model's rope types whose rotation depends on the sequence length (dynamic, longrope),
    for a transformers config or a config.json dict; empty when a KV cache built at one length
    is exact at every other."""
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return sorted(rope_types(config_dict) & set(LENGTH_DEPENDENT_TYPES))


def prefix_reuse_supported(config) -> bool:
    return not length_dependent_rope(config)


@contextlib.contextmanager
def evaluation_mode(model, sharding: Sharding | None = None):
    """model.eval() and, for an sdpa model on the CPU, `longctx_cached` attention (eval/attention.py)
    for a block, or `longctx_sharded` (eval/sharded.py) with a sharding; both restored after.

    With a sharding, freed cache buffers and activations go back to the system from here on
    (cache.keep_heap_small): a rank's memory is the point of sharding. One process keeps glibc's
    own allocation, which costs less CPU time (benchmarks/eval_heap_threshold.py)."""
    if sharding is not None:
        keep_heap_small()
    was_training = model.training
    model.eval()
    try:
        with sharded_attention(model) if sharding is not None else cached_attention(model):
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def prefill(model, cache, ids: list[int], *, chunk_size: int = DEFAULT_CHUNK, keep: int = 1) -> torch.Tensor | None:
    """Run ids through the model on top of `cache` in chunks; returns the logits of the last `keep`
    positions (shape keep x vocab), or None for keep=0. Chunks bound activation memory.

    The kept positions ride in the last chunk: a forward pass of their own would read every
    weight once more, as a decode step does."""
    if not ids:
        return None
    last_start = (len(ids) - 1) // chunk_size * chunk_size
    if len(ids) - last_start < keep:  # the kept positions do not fit in the last chunk: they get their own
        last_start = max(len(ids) - keep, 0)
    for start in range(0, last_start, chunk_size):
        forward(model, cache, ids[start : min(start + chunk_size, last_start)], keep=0)
    return forward(model, cache, ids[last_start:], keep=keep)


def forward(model, cache, ids: list[int], *, keep: int) -> torch.Tensor | None:
    """One forward pass of ids on top of `cache` (a sharded cache runs it across its ranks): the
    logits of the last `keep` positions (keep x vocab, float32), or None for keep=0."""
    if is_sharded(cache):
        return cache.run(model, ids, keep)
    extra = {}
    if is_based(cache):  # a prompt reading the reused prefix in place: only longctx_cached attention takes it
        if not reads_prefix_in_place(model):
            raise LongctxError(f"a cache that reads its prefix in place runs only under {CACHED_ATTENTION} attention "
                               f"(the engine's evaluation_mode), not {model.config._attn_implementation!r}")
        extra[BASE_KEYWORD] = cache.base
    logits = model(
        input_ids=torch.tensor([ids], device=model.device), use_cache=True, **{cache_keyword(model): cache},
        logits_to_keep=max(keep, 1), **extra,  # 0 would mean all positions
    ).logits
    return logits[0, -keep:].float() if keep else None


def reads_prefix_in_place(model) -> bool:
    """Whether the model attends with longctx_cached, which takes a reused prefix as a block of its
    own (so a prompt's cache reads the prefix in place instead of copying it)."""
    return getattr(model.config, "_attn_implementation", None) == CACHED_ATTENTION


def keep_first(cache, length: int) -> None:
    """Drop every position of `cache` from `length` on."""
    if is_sharded(cache) or is_based(cache):
        cache.keep_first(length)
        return
    for layer in cache.layers:
        layer.keep_first(length)


class PrefixCache:
    """The KV cache of `clean_tokens` (head + haystack), grown on demand and shared by all prompts;
    with a `sharding`, every cache it hands out is sharded across its ranks (eval/sharded.py)."""

    def __init__(self, model, clean_tokens: list[int], *, enabled: bool = True, chunk_size: int = DEFAULT_CHUNK,
                 sharding: Sharding | None = None):
        self.model = model
        self.clean_tokens = clean_tokens
        self.enabled = enabled
        self.chunk_size = chunk_size
        self.sharding = sharding
        self.cache = self.new_cache()
        self.length = 0
        self.tokens_processed = 0  # clean tokens run through the model (for the work accounting)

    def start(self, ids: list[int], shared: int, answer_tokens: int = 0):
        """(cache, position): a cache holding ids[:position] and the position to continue from; the
        cache has room for all of ids and `answer_tokens` more."""
        capacity = len(ids) + answer_tokens
        if not self.enabled or shared == 0:
            return self.new_cache(capacity), 0
        if ids[:shared] != self.clean_tokens[:shared]:
            raise ValueError("prompt does not start with the clean haystack tokens")
        if shared > self.length:
            prefill(self.model, self.cache, self.clean_tokens[self.length : shared], chunk_size=self.chunk_size, keep=0)
            self.tokens_processed += shared - self.length
            self.length = shared
        if self.sharding is not None:
            return self.cache.continuation(shared, capacity), shared
        if reads_prefix_in_place(self.model):
            return continued_cache(self.cache, shared, capacity), shared
        return cropped_copy(self.cache, shared, capacity), shared

    def new_cache(self, capacity: int = 0):
        return self.sharding.new_cache(capacity) if self.sharding is not None else new_cache(capacity)

    def shared_with(self, ids: list[int]) -> int:
        """How many leading tokens of ids agree with the clean tokens (the longest common prefix), less
        one so that the prompt's last token still runs and gives the next token's logits."""
        limit = min(len(ids) - 1, len(self.clean_tokens))
        shared = 0
        while shared < limit and ids[shared] == self.clean_tokens[shared]:
            shared += 1
        return shared


@dataclass
class Answer:
    text: str
    parts_right: list[bool] | None  # teacher forcing: whether each answer part was the argmax; None for generation
    new_tokens: int  # prompt tokens run through the model for this answer


@torch.no_grad()
def greedy_answer(
    model, tokenizer, prefix: PrefixCache, ids: list[int], shared: int, max_new_tokens: int,
    settled: Callable[[str], bool] | None = None, draft: list[int] = (), first_line: bool = True,
) -> Answer:
    """Greedy continuation of the prompt, stopping at end of sequence, at the end of the first line
    (unless first_line=False: then the whole continuation is the answer, as RULER reads it), or as
    soon as `settled(text)` says more tokens cannot change the score. On CPU a decode step reads
    every weight, so the steps saved matter as much as a few hundred prompt tokens each.

    `draft` (the expected answer's tokens) is verified in the prompt's own forward pass, as in
    assisted generation: the greedy tokens are read off that pass for as long as they agree with
    the draft, and decoding one token at a time starts only where they differ. A right answer
    then costs no decode step at all; the answer is the greedy one either way."""
    draft = list(draft)[: max(max_new_tokens - 1, 0)]
    cache, position = prefix.start(ids, shared, max_new_tokens)
    with rotation_for_length(model, len(ids) + len(draft)):
        logits = prefill(model, cache, (ids + draft)[position:], chunk_size=prefix.chunk_size, keep=len(draft) + 1)
    stop_ids = _stop_ids(model, tokenizer)
    generated: list[int] = []
    for token in islice(_greedy_tokens(model, cache, logits, draft, len(ids)), max_new_tokens):
        if token in stop_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if (first_line and "\n" in text.lstrip()) or (settled is not None and settled(text.lstrip())):
            break
    text = tokenizer.decode(generated, skip_special_tokens=True).strip()
    return Answer(text.split("\n")[0].strip() if first_line else text, None, len(ids) - position)


def _greedy_tokens(model, cache, logits: torch.Tensor, draft: list[int], prompt_length: int) -> Iterator[int]:
    """The greedy tokens after a prompt, lazily. `cache` holds the prompt and the draft; `logits[i]`
    are the logits after the prompt and draft[:i]."""
    accepted = 0
    token = int(logits[0].argmax())
    while accepted < len(draft) and token == draft[accepted]:
        yield token
        accepted += 1
        token = int(logits[accepted].argmax())
    yield token
    keep_first(cache, prompt_length + accepted)  # forget the draft tokens after the first disagreement
    while True:
        token = int(forward(model, cache, [token], keep=1)[-1].argmax())
        yield token


@torch.no_grad()
def teacher_forced_answer(
    model, tokenizer, prefix: PrefixCache, ids: list[int], shared: int, answer_parts: list[list[int]]
) -> Answer:
    """One forward pass over prompt + answer: each part (a run of answer tokens) counts as right
    when every one of its tokens is the argmax, as EasyContext's eval_forward does."""
    answer_ids = [token for part in answer_parts for token in part]
    cache, position = prefix.start(ids, shared, len(answer_ids))
    with rotation_for_length(model, len(ids) + len(answer_ids) - 1):  # one pass over prompt + answer, as transformers'
        logits = prefill(model, cache, (ids + answer_ids[:-1])[position:], chunk_size=prefix.chunk_size, keep=len(answer_ids))
    predicted = logits.argmax(-1).tolist()
    parts_right, cursor = [], 0
    for part in answer_parts:
        parts_right.append(predicted[cursor : cursor + len(part)] == part)
        cursor += len(part)
    text = tokenizer.decode(predicted, skip_special_tokens=True).strip()
    return Answer(text, parts_right, len(ids) + len(answer_ids) - 1 - position)


def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


# Memory ---------------------------------------------------------------------------------------


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def estimate_memory_bytes(model, length: int, *, chunk_size: int = DEFAULT_CHUNK, reuse: bool = True,
                          ranks: int = 1) -> int:
    """Peak memory of evaluating one prompt of `length` tokens: the KV caches (the shared prefix,
    plus the prompt's copy of it unless the prompt reads it in place, as it does under
    longctx_cached: a CPU sdpa model), one chunk's attention scores and MLP activations, and the
    weights. With `ranks` > 1, one rank's: its share of the cache (read in place), the scores of a
    chunk's queries over that share, its piece of the chunk's MLP."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype_bytes = next(model.parameters()).element_size()
    in_place = reads_prefix_in_place(model) or takes_cached_attention(model)  # inside or before evaluation_mode
    shared_copies = 2 if reuse and ranks == 1 and not in_place else 1
    caches = shared_copies * -(-length // ranks) * kv_bytes_per_token(config, dtype_bytes)
    chunk = min(chunk_size, length)
    attention = text.num_attention_heads * chunk * -(-length // ranks) * 4  # scores in float32 (eager/math kernels)
    chunk = -(-chunk // ranks)
    mlp = chunk * (getattr(text, "intermediate_size", 4 * text.hidden_size) * 3 + text.hidden_size * 4) * dtype_bytes
    logits = 64 * text.vocab_size * 4  # only the last positions' logits are kept
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(caches + 2 * attention + mlp + logits + weights)


def available_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(model, length: int, *, chunk_size: int = DEFAULT_CHUNK, reuse: bool = True, ranks: int = 1) -> int:
    """Refuse up front, with the figures, a length whose evaluation would not fit in memory (one rank's
    share of it with `ranks` > 1)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = estimate_memory_bytes(model, length, chunk_size=chunk_size, reuse=reuse, ranks=ranks) - weights
    free = available_memory_bytes(model.device)
    if need > 0.9 * free:
        raise LongctxError(
            f"length {length} needs about {need / 2**30:.1f} GiB beyond the loaded weights (KV cache + activations) "
            f"but {free / 2**30:.1f} GiB is available; use shorter --lengths, a smaller --chunk-size "
            "or more ranks (torchrun ... --sequence-parallel P)"
        )
    return need
