"""Evaluate (length, depth, sample) cells of a retrieval task on a loaded model.

`Evaluator` holds what a run shares (prompt builder, haystack tokens, prefix KV cache) and
scores one cell at a time; `passkey_accuracy` is the one-call form other packages use.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from longctx.errors import LongctxError
from longctx.eval.engine import (
    DEFAULT_CHUNK,
    PrefixCache,
    evaluation_mode,
    greedy_answer,
    length_dependent_rope,
    prefix_reuse_supported,
    teacher_forced_answer,
)
from longctx.eval.scoring import score_answer, score_is_settled
from longctx.tasks.haystacks import build_haystack, encode
from longctx.tasks.prompts import PromptBuilder, detect_style
from longctx.tasks.retrieval import Task

log = logging.getLogger(__name__)

SCORINGS = ("generate", "teacher-forced")
EXTRA_NEW_TOKENS = 8  # generation budget beyond the expected answer's length


def sample_rng(seed: int, length: int, depth: float, index: int) -> random.Random:
    """The same (seed, cell, sample) always draws the same needle values."""
    return random.Random(f"{seed}:{length}:{depth:g}:{index}")


@dataclass
class CellResult:
    length: int
    depth: float
    sample: int
    task: str
    answer: str
    expected: list[str]
    score: float
    seconds: float
    needle_position: int  # token index of the (first) needle in the prompt
    processed_tokens: int  # prompt tokens run through the model for this cell (prefix reuse saves the rest)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Evaluator:
    """Scores cells of one task on one model; reuses the haystack prefix KV cache when exact."""

    def __init__(
        self,
        model,
        tokenizer,
        task: Task,
        *,
        max_length: int,
        haystack: str = "noise",
        haystack_text: str | None = None,
        prompt_style: str = "auto",
        scoring: str = "generate",
        prefix_reuse: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        seed: int = 0,
        sharding=None,
    ):
        if scoring not in SCORINGS:
            raise LongctxError(f"unknown scoring {scoring!r}: choose one of {', '.join(SCORINGS)}")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.scoring, self.seed = scoring, seed
        self.style = detect_style(tokenizer, prompt_style, task.name)
        self.static_rope = prefix_reuse_supported(model.config)
        self.prefix_reuse = prefix_reuse and self.static_rope
        if prefix_reuse and not self.prefix_reuse:
            log.warning(
                "rope type %s changes the rotation with the sequence length, so a haystack KV cache cannot be "
                "reused exactly: prefilling every prompt from scratch", ", ".join(length_dependent_rope(model.config)),
            )
        built = build_haystack(tokenizer, haystack, max_length, text=haystack_text)
        self.builder = PromptBuilder(tokenizer, built, task.instruction, self.style)
        self.sharding = sharding  # eval/sharded.py's Sharding: the KV caches are split across its ranks
        self.prefix = PrefixCache(model, self.builder.clean_tokens, enabled=self.prefix_reuse, chunk_size=chunk_size,
                                  sharding=sharding)

    @property
    def haystack(self):
        return self.builder.haystack

    def evaluate(self, length: int, depth: float, index: int = 0) -> CellResult:
        started = time.perf_counter()
        sample = self.task.sample(sample_rng(self.seed, length, depth, index))
        prompt = self.builder.build(sample, length, depth)
        with evaluation_mode(self.model, self.sharding):
            if self.scoring == "teacher-forced":
                pieces = [encode(self.tokenizer, text) for text, _ in sample.answer_pieces]
                answer = teacher_forced_answer(
                    self.model, self.tokenizer, self.prefix, prompt.ids, prompt.shared_prefix, pieces
                )
                scored = [right for right, (_, counts) in zip(answer.parts_right, sample.answer_pieces) if counts]
                score = sum(scored) / len(scored)
            else:
                expected = encode(self.tokenizer, sample.answer)
                answer = greedy_answer(
                    self.model, self.tokenizer, self.prefix, prompt.ids, prompt.shared_prefix,
                    len(expected) + EXTRA_NEW_TOKENS, settled=lambda text: score_is_settled(sample, text),
                    draft=expected if self.static_rope else (),  # a draft lengthens the prompt's pass
                )
                score = score_answer(sample, answer.text)
        return CellResult(
            length=length,
            depth=depth,
            sample=index,
            task=self.task.name,
            answer=answer.text,
            expected=sample.expected,
            score=float(score),
            seconds=round(time.perf_counter() - started, 3),
            needle_position=prompt.needle_starts[0],
            processed_tokens=answer.new_tokens,
        )


def evenly_spaced_depths(count: int) -> list[float]:
    """count depths from 0 to 100 percent (50 for a single one)."""
    if count == 1:
        return [50.0]
    return [round(100.0 * i / (count - 1), 3) for i in range(count)]


def passkey_accuracy(
    model,
    tokenizer,
    *,
    length: int,
    num_samples: int = 5,
    depths: list[float] | None = None,
    seed: int = 0,
    scoring: str = "generate",
) -> float:
    """Mean passkey-retrieval score of prompts of exactly `length` tokens (noise haystack).

    Without `depths`, the num_samples probes are spread over evenly spaced depths (0 to 100%,
    one probe each); with `depths`, every depth gets num_samples probes. The prompt is the raw
    text of the classic passkey test (as in `longctx train`'s synthetic passkey data) for every
    model. The haystack KV prefix is reused across probes unless the rope type forbids it.
    """
    if depths is None:
        cells = [(depth, 0) for depth in evenly_spaced_depths(num_samples)]
    else:
        cells = [(float(depth), index) for depth in depths for index in range(num_samples)]
    evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=length, scoring=scoring, seed=seed)
    with torch.no_grad():
        scores = [evaluator.evaluate(length, depth, index).score for depth, index in cells]
    return sum(scores) / len(scores)
