"""Scoring a retrieval answer: the rule each task's samples name (see longctx/tasks/retrieval.py).

- `first_integer`: the passkey test's exact match of the first integer in the answer;
- `all_values`: RULER's string_match_all, the fraction of expected values found (case-insensitive);
  its string_match_part (any expected value found) scores RULER's QA tasks (eval/suite.py);
- `keywords`: the fraction of the needle's content words (not stopwords, not in the question) said.
"""

from __future__ import annotations

import re

from longctx.tasks.retrieval import Sample

STOPWORDS = frozenset("a an and are as at be by for in is it of on or the to was were with".split())
WORD = re.compile(r"[a-z0-9]+")


def first_integer_match(answer: str, expected: str) -> float:
    """1.0 when the first integer in the answer is the expected one (the passkey test's rule)."""
    match = re.search(r"\d+", answer)
    return float(match is not None and match.group(0) == expected)


def string_match_all(answer: str, expected: list[str]) -> float:
    """RULER's string_match_all: the fraction of expected strings found in the answer, ignoring case."""
    answer = answer.lower()
    return sum(value.lower() in answer for value in expected) / len(expected)


def string_match_part(answer: str, expected: list[str]) -> float:
    """RULER's string_match_part (its QA metric): 1 when any expected string is in the answer, ignoring case."""
    answer = answer.lower()
    return float(any(value.lower() in answer for value in expected))


RULER_METRICS = {"all": string_match_all, "part": string_match_part}


def ruler_score(metric: str, answer: str, expected: list[str]) -> float:
    """A RULER task's score of one answer in [0, 1] (RULER reports the mean x 100)."""
    return RULER_METRICS[metric](answer, expected)


def ruler_postprocess(text: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def keyword_recall(answer: str, needle: str, question: str) -> float:
    """The fraction of the needle's content words (not stopwords, not in the question) in the answer."""
    asked = set(WORD.findall(question.lower()))
    keywords = [w for w in dict.fromkeys(WORD.findall(needle.lower())) if w not in asked and w not in STOPWORDS]
    if not keywords:
        keywords = [w for w in dict.fromkeys(WORD.findall(needle.lower()))]
    said = set(WORD.findall(answer.lower()))
    return sum(w in said for w in keywords) / len(keywords)


def score_answer(sample: Sample, answer: str) -> float:
    """Score a generated answer (the text after the answer prefix) in [0, 1]."""
    if sample.scoring == "first_integer":
        return first_integer_match(answer, sample.expected[0])
    if sample.scoring == "all_values":
        return string_match_all(answer, sample.expected)
    return keyword_recall(answer, sample.expected[0], sample.question)


def score_is_settled(sample: Sample, answer: str) -> bool:
    """Whether no continuation of this partial answer can change its score, so generation may stop:
    the first integer has ended (first_integer), or the score is already 1 (recall scores only grow)."""
    if sample.scoring == "first_integer":
        return re.search(r"\d+\D", answer) is not None
    return score_answer(sample, answer) == 1.0
