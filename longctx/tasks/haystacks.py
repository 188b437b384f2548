"""Haystack text, offline: where it comes from, and its tokens with their sentence boundaries.

A haystack reference is one of:
- `noise`: the repeated "The grass is green. The sky is blue. ..." text of the passkey test
  (Landmark Attention, YaRN, RULER's `noise`);
- `essays`: long English prose that ships with Python itself: the 79 help topics of
  `pydoc_data.topics` (the text behind `help('FOR')`; about 465K characters, 113K tokens with
  the default model's tokenizer; PSF license);
- `file:PATH` (one text file), `dir:PATH` (every *.txt and *.md file under PATH, sorted);
- `dataset:NAME[:SPLIT[:COLUMN]]`: rows of a `datasets` dataset joined by blank lines. NAME is a
  local .json/.jsonl/.csv/.parquet/.txt file or a dataset directory, or a hub name where the hub
  is reachable; SPLIT defaults to train, COLUMN to `text`.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import LongctxError

log = logging.getLogger(__name__)

NOISE_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SENTENCE_END = (".", "!", "?", "\n")
TEXT_SUFFIXES = (".txt", ".md")
# file suffix -> the `datasets` builder that reads it (dataset haystacks and training data alike)
DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}
NOISE_TEXT_CHARS = 200_000  # about 45K tokens; repeated further when a length needs more


def load_haystack_text(reference: str) -> str:
    """The text of a haystack reference (see the module docstring)."""
    kind, _, argument = reference.partition(":")
    if reference == "noise":
        return " ".join([NOISE_SENTENCES] * (NOISE_TEXT_CHARS // (len(NOISE_SENTENCES) + 1)))
    if reference == "essays":
        from pydoc_data.topics import topics

        return "\n\n".join(topic.strip() for topic in topics.values())
    if kind == "file" and argument:
        return _read_text_file(Path(argument).expanduser())
    if kind == "dir" and argument:
        return _read_text_dir(Path(argument).expanduser())
    if kind == "dataset" and argument:
        return _read_dataset(argument)
    raise LongctxError(
        f"unknown haystack {reference!r}: use noise, essays, file:PATH, dir:PATH or dataset:NAME[:SPLIT[:COLUMN]]"
    )


def haystack_path(reference: str) -> Path | None:
    """The local file or directory a haystack reference reads, if any (an input no output may overlap)."""
    kind, _, argument = reference.partition(":")
    if kind in ("file", "dir") and argument:
        return Path(argument).expanduser()
    if kind == "dataset" and argument and Path(argument.split(":")[0]).expanduser().exists():
        return Path(argument.split(":")[0]).expanduser()
    return None


def _read_text_file(path: Path) -> str:
    if not path.is_file():
        raise LongctxError(f"haystack file {path} does not exist; pass file:PATH of a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LongctxError(f"haystack file {path} is not UTF-8 text ({error}); convert it to UTF-8") from error


def _read_text_dir(path: Path) -> str:
    if not path.is_dir():
        raise LongctxError(f"haystack directory {path} does not exist; pass dir:PATH of a directory of .txt files")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise LongctxError(f"haystack directory {path} has no .txt or .md files; add some or use file:PATH")
    return "\n\n".join(_read_text_file(p).strip() for p in files)


def dataset_errors() -> tuple[type[Exception], ...]:
    """What `datasets` raises for a file or dataset it cannot read: a missing file or an unreachable
    hub (OSError), a bad split or a parse error from pyarrow (ValueError), a file it cannot build
    (DatasetsError). Anything else is a bug and propagates."""
    import datasets

    return (OSError, ValueError, datasets.exceptions.DatasetsError)


def _read_dataset(spec: str) -> str:
    name, _, rest = spec.partition(":")
    split, _, column = rest.partition(":")
    split, column = split or "train", column or "text"
    import datasets

    path = Path(name).expanduser()
    builder = DATASET_BUILDERS.get(path.suffix.lower())
    if path.is_file() and builder is None:
        raise LongctxError(f"cannot read {path} as a dataset; use a {', '.join(DATASET_BUILDERS)} file")
    try:
        if path.is_file():
            data = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        elif path.is_dir() and any(path.glob("*.arrow")):
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(name, split=split)
    except dataset_errors() as error:
        raise LongctxError(f"cannot load dataset {name!r} split {split!r}: {error}") from error
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise LongctxError(f"dataset {name!r} has no split {split!r}; it has {', '.join(data)}")
        data = data[split]
    if column not in data.column_names:
        raise LongctxError(f"dataset {name!r} has no column {column!r}; pick one of {', '.join(data.column_names)}")
    return "\n\n".join(str(text).strip() for text in data[column] if text)


@dataclass
class Haystack:
    """A haystack's tokens and the token indices where a sentence may be inserted.

    `boundaries[k]` is an index i such that a needle placed before token i follows the end
    of a sentence (token i-1 ends with . ! ? or a newline); 0 is always a boundary.
    """

    name: str
    tokens: list[int]
    boundaries: list[int]
    repeats: int = 1

    def boundary_at_or_before(self, index: int) -> int:
        """The last sentence boundary <= index (0 when none)."""
        return self.boundaries[bisect.bisect_right(self.boundaries, index) - 1]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text without special tokens (and without the too-long warning)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def sentence_boundaries(tokenizer, tokens: list[int]) -> list[int]:
    """Indices i (0 included) where token i-1 ends a sentence."""
    ends_sentence = {}
    boundaries = [0]
    for i, token in enumerate(tokens, start=1):
        if token not in ends_sentence:
            ends_sentence[token] = tokenizer.decode([token]).rstrip(" ").endswith(SENTENCE_END)
        if ends_sentence[token]:
            boundaries.append(i)
    return boundaries


def build_haystack(tokenizer, reference: str, min_tokens: int, *, text: str | None = None) -> Haystack:
    """Tokenize a haystack once, repeating its text until it has at least min_tokens tokens."""
    text = load_haystack_text(reference) if text is None else text
    if not text.strip():
        raise LongctxError(f"haystack {reference!r} is empty; point at a file or dataset with text in it")
    unit = encode(tokenizer, text.strip() + "\n\n")
    repeats = max(1, -(-min_tokens // len(unit)))
    if repeats > 1:
        log.info(
            "haystack %s has %d tokens, fewer than the %d needed: repeating it %d times",
            reference, len(unit), min_tokens, repeats,
        )
    tokens = unit * repeats
    return Haystack(reference, tokens, sentence_boundaries(tokenizer, tokens), repeats)
