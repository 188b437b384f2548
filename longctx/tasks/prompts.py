"""Prompts of exactly L tokens: template, instruction, haystack with needles, question, answer prefix.

A prompt is assembled in token space from separately tokenized pieces, so its length is
exact for any tokenizer:

    head (template start + instruction)  haystack[:b1] needle1 haystack[b1:b2] ...  tail

`tail` is the question, the template's end and the answer prefix. The haystack slice is
as long as the budget leaves, and each needle goes at the last sentence boundary at or
before its token depth. For chat models (a tokenizer with a chat template) the answer
prefix comes after the assistant header, so the model answers instead of refusing; base
models get the raw prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import LongctxError
from longctx.tasks.haystacks import Haystack, encode

PROMPT_STYLES = ("auto", "chat", "raw")
CONTEXT_MARK = "\x00CONTEXT\x00"


def detect_style(tokenizer, style: str = "auto", task: str | None = None) -> str:
    """auto: the chat template when the tokenizer has one, except for the passkey task, which is
    the raw-text completion test by definition (Landmark Attention, YaRN). On SmolLM2-135M-Instruct
    at 2K tokens the chat-wrapped passkey prompt scored 0.7 against 1.0 for the raw one."""
    if style not in PROMPT_STYLES:
        raise LongctxError(f"unknown prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has_template:
        raise LongctxError("--prompt chat needs a tokenizer with a chat template; this one has none, use --prompt raw")
    if style == "auto":
        return "chat" if has_template and task != "passkey" else "raw"
    return style


def prompt_head(tokenizer, instruction: str, style: str) -> list[int]:
    """Tokens before the haystack; the same for every sample of a task (the reusable prefix)."""
    head_text, _ = _split_template(tokenizer, instruction, "?", style)
    if style == "raw":
        ids = list(tokenizer(head_text, add_special_tokens=True, verbose=False)["input_ids"])
        return ids
    return encode(tokenizer, head_text)


def prompt_tail(tokenizer, instruction: str, question: str, answer_prefix: str, style: str) -> list[int]:
    """Tokens after the haystack: question, template end, answer prefix (no trailing space)."""
    _, tail_text = _split_template(tokenizer, instruction, question, style)
    return encode(tokenizer, tail_text + answer_prefix)


def _split_template(tokenizer, instruction: str, question: str, style: str) -> tuple[str, str]:
    if style == "raw":
        return f"{instruction}\n", f"\n{question} "
    user = f"{instruction}\n{CONTEXT_MARK}\n{question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    head, mark, tail = text.partition(CONTEXT_MARK)
    if not mark:
        raise LongctxError("the tokenizer's chat template drops the message text; use --prompt raw")
    return head, tail


@dataclass
class Prompt:
    """A prompt's token ids and where its pieces are."""

    ids: list[int]
    needle_starts: list[int]  # token index of each needle in ids
    needle_lengths: list[int]
    haystack_tokens: int  # haystack tokens used (needles excluded)

    @property
    def shared_prefix(self) -> int:
        """Tokens before the first needle: equal to head + haystack[:b1], reusable across cells."""
        return self.needle_starts[0]


def needle_depths(depth: float, count: int) -> list[float]:
    """Depths of `count` needles: the first at `depth`, the rest evenly spaced after it up to 100."""
    step = (100.0 - depth) / count
    return [depth + i * step for i in range(count)]


def assemble_prompt(
    head: list[int], tail: list[int], haystack: Haystack, needles: list[list[int]], length: int, depth: float
) -> Prompt:
    """Build a prompt of exactly `length` tokens with needles at and after `depth` percent."""
    if not 0.0 <= depth <= 100.0:
        raise LongctxError(f"depth {depth} is outside 0-100; give depths as percentages")
    budget = length - len(head) - len(tail) - sum(len(n) for n in needles)
    if budget < 0:
        raise LongctxError(
            f"length {length} is too short: template, question and needles alone take {length - budget} tokens"
        )
    if budget > len(haystack.tokens):
        raise LongctxError(f"haystack has {len(haystack.tokens)} tokens, fewer than the {budget} needed; build it longer")
    ids = list(head)
    starts, cursor = [], 0
    for needle, needle_depth in zip(needles, needle_depths(depth, len(needles))):
        boundary = max(cursor, haystack.boundary_at_or_before(round(budget * needle_depth / 100.0)))
        ids.extend(haystack.tokens[cursor:boundary])
        starts.append(len(ids))
        ids.extend(needle)
        cursor = boundary
    ids.extend(haystack.tokens[cursor:budget])
    ids.extend(tail)
    return Prompt(ids, starts, [len(n) for n in needles], budget)


@dataclass
class PromptBuilder:
    """Everything about prompts that is fixed for a run: tokenizer, style, haystack, instruction."""

    tokenizer: object
    haystack: Haystack
    instruction: str
    style: str

    def __post_init__(self):
        self.head = prompt_head(self.tokenizer, self.instruction, self.style)

    @property
    def clean_tokens(self) -> list[int]:
        """head + haystack: every prompt's tokens agree with these up to its first needle."""
        return self.head + self.haystack.tokens

    def build(self, sample, length: int, depth: float) -> Prompt:
        tail = prompt_tail(self.tokenizer, self.instruction, sample.question, sample.answer_prefix, self.style)
        needles = [encode(self.tokenizer, " " + needle) for needle in sample.needles]
        return assemble_prompt(self.head, tail, self.haystack, needles, length, depth)
