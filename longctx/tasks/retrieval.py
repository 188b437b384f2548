"""Retrieval tasks: what is hidden in the haystack, what is asked, and what counts as right.

- `passkey`: "The pass key is 12345. Remember it. 12345 is the pass key." (Landmark Attention,
  YaRN); scored by exact match of the first integer in the answer.
- `reverse`: "The list is 4 7 1 9 2." asked back in reverse order ("2 9 1 7 4"): retrieval plus
  a transformation a passkey model lacks; scored by exact match of the whole reversed list
  (`all_values` with the one list as its value).
- `needle`: gkamradt's San Francisco sentence and question, or the user's own; scored by the
  fraction of the needle's content words (those not in the question) found in the answer.
- RULER's NIAH family, needles "One of the special magic {numbers} for {key} is: {value}.":
  `single` (one needle), `multikey` (the asked key among 3 distractor keys), `multivalue`
  (4 values for one key, all asked), `multiquery` (4 keys, all asked); values are 7-digit
  numbers, adjective-noun words or uuids; scored by RULER's string_match_all (the fraction of
  expected values found in the answer, case-insensitive).

Every sample of a task shares one instruction (the text before the haystack), so the KV
cache of instruction + haystack can be reused across samples and depths. A sample names its
scoring rule; the rules themselves are evaluation's (longctx/eval/scoring.py).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from longctx.errors import LongctxError

TASKS = ("passkey", "reverse", "needle", "single", "multikey", "multivalue", "multiquery")
VALUE_TYPES = ("numbers", "words", "uuids")
REVERSE_LENGTH = 5  # distinct digits in a reverse task's list
RULER_NEEDLES = 4  # needles of multikey / multivalue / multiquery (RULER's num_needle_k/v/q = 4)

GKAMRADT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
GKAMRADT_QUESTION = "What is the best thing to do in San Francisco?"
GKAMRADT_ANSWER_PREFIX = "The best thing to do in San Francisco is"
GKAMRADT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
REVERSE_INSTRUCTION = (
    "There is a list of digits hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will ask you to say it backwards."
)
NEEDLE_INSTRUCTION = "Read the following text carefully. I will ask you a question about it afterwards."

# Keys and word values: adjective-noun pairs, as RULER draws with wonderwords (3,600 pairs here).
ADJECTIVES = (
    "ancient bitter brave bright calm cheerful clever cold crimson curious damp dark eager elegant "
    "empty faint fierce fluffy fragile gentle giant golden grumpy hollow humble icy jolly kind lazy "
    "lively lonely loud lucky mighty misty modern narrow noisy odd old pale polite proud quiet rapid "
    "rare rough round rusty silent silver sleepy slow smooth soft spicy steady stormy sweet tall tiny"
).split()
NOUNS = (
    "anchor apple badger bakery banjo beacon blanket bottle bridge bucket cactus camel candle canyon "
    "carpet castle cherry cloud comet compass cottage crayon desert dolphin dragon falcon feather "
    "forest fountain garden glacier hammer harbor helmet island jacket kettle ladder lantern lemon "
    "meadow mirror mountain needle orchard otter pencil pepper piano pillow planet pocket river rocket"
).split()


@dataclass
class Sample:
    """One question of a task: the needles to hide (in order of depth) and the expected answer."""

    needles: list[str]
    question: str
    answer_prefix: str
    expected: list[str]
    answer_pieces: list[tuple[str, bool]]  # a correct continuation of answer_prefix, in pieces; True = scored
    scoring: str  # "first_integer", "all_values" or "keywords"

    @property
    def answer(self) -> str:
        return "".join(text for text, _ in self.answer_pieces)


@dataclass
class Task:
    """A task and its options; `sample(rng)` draws one question."""

    name: str = "passkey"
    value_type: str = "numbers"
    needle: str | None = None
    question: str | None = None
    answer_prefix: str | None = None
    answer: str | None = None

    def __post_init__(self):
        if self.name not in TASKS:
            raise LongctxError(f"unknown task {self.name!r}: choose one of {', '.join(TASKS)}")
        if self.value_type not in VALUE_TYPES:
            raise LongctxError(f"unknown value type {self.value_type!r}: choose one of {', '.join(VALUE_TYPES)}")
        custom = (self.needle, self.question, self.answer_prefix, self.answer)
        if self.name != "needle" and any(value is not None for value in custom):
            raise LongctxError("--needle, --question, --answer-prefix and --answer apply to --task needle only")
        if self.name == "needle" and (self.needle is None) != (self.question is None):
            raise LongctxError("give --needle and --question together (or neither, for gkamradt's needle)")

    @property
    def value_noun(self) -> str:
        return {"numbers": "number", "words": "word", "uuids": "uuid"}[self.value_type]

    @property
    def instruction(self) -> str:
        if self.name == "passkey":
            return PASSKEY_INSTRUCTION
        if self.name == "reverse":
            return REVERSE_INSTRUCTION
        if self.name == "needle":
            return NEEDLE_INSTRUCTION
        noun = self.value_noun
        if self.name in ("single", "multikey"):
            return (
                f"A special magic {noun} is hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards."
            )
        return (
            f"Some special magic {noun}s are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {noun}s afterwards."
        )

    def sample(self, rng: random.Random) -> Sample:
        if self.name == "passkey":
            key = str(rng.randint(10000, 99999))
            return Sample(
                needles=[f"The pass key is {key}. Remember it. {key} is the pass key."],
                question="What is the pass key?",
                answer_prefix="The pass key is",
                expected=[key],
                answer_pieces=[(f" {key}", True)],
                scoring="first_integer",
            )
        if self.name == "reverse":
            digits = rng.sample("0123456789", REVERSE_LENGTH)
            backwards = " ".join(reversed(digits))
            return Sample(
                needles=[f"The list is {' '.join(digits)}."],
                question="What is the list backwards?",
                answer_prefix="The list backwards is",
                expected=[backwards],
                answer_pieces=[(f" {backwards}", True)],
                scoring="all_values",
            )
        if self.name == "needle":
            if self.needle is None:
                return Sample([GKAMRADT_NEEDLE], GKAMRADT_QUESTION, GKAMRADT_ANSWER_PREFIX, [GKAMRADT_NEEDLE],
                              [(" " + GKAMRADT_ANSWER, True)], "keywords")
            prefix = self.answer_prefix if self.answer_prefix is not None else "Answer:"
            answer = self.answer if self.answer is not None else self.needle
            return Sample([self.needle], self.question, prefix, [answer], [(" " + answer, True)], "keywords")
        return self._ruler_sample(rng)

    def _ruler_sample(self, rng: random.Random) -> Sample:
        count = 1 if self.name == "single" else RULER_NEEDLES
        keys = _distinct(rng, count if self.name in ("multikey", "multiquery") else 1, lambda: _word_pair(rng))
        values = _distinct(rng, count, lambda: self._value(rng))
        if self.name == "multivalue":
            keys = keys * count
        noun = self.value_noun
        needles = [f"One of the special magic {noun}s for {key} is: {value}." for key, value in zip(keys, values)]
        if self.name in ("single", "multikey"):  # the first needle is the one asked for; the others distract
            query, expected = keys[0], values[:1]
            question = f"What is the special magic {noun} for {query} mentioned in the provided text?"
            prefix = f"The special magic {noun} for {query} mentioned in the provided text is"
        else:
            query = keys[0] if self.name == "multivalue" else ", ".join(keys[:-1]) + f" and {keys[-1]}"
            expected = values
            question = f"What are all the special magic {noun}s for {query} mentioned in the provided text?"
            prefix = f"The special magic {noun}s for {query} mentioned in the provided text are"
        return Sample(needles, question, prefix, expected, _value_pieces(expected), "all_values")

    def _value(self, rng: random.Random) -> str:
        if self.value_type == "numbers":
            return str(rng.randint(1_000_000, 9_999_999))
        if self.value_type == "words":
            return _word_pair(rng)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _value_pieces(values: list[str]) -> list[tuple[str, bool]]:
    """' v1, v2, v3' as pieces: each value scored, the commas between them not."""
    pieces = [(f" {values[0]}", True)]
    for value in values[1:]:
        pieces += [(",", False), (f" {value}", True)]
    return pieces


def _word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct(rng: random.Random, count: int, draw) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw()
        if value not in values:
            values.append(value)
    return values
