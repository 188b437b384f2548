"""Training data: documents from files or a synthetic passkey source, packed into seq_len rows.

A document is a list of token ids plus, optionally, a mask of which tokens are targets
(the passkey source can train on the answer only). Packing fills each row of seq_len
tokens with consecutive documents and keeps their boundaries:

- position_ids restart at 0 at each document (and at each row: a document cut at the end
  of a row continues in the next one as a new segment);
- labels are shifted here, before any sequence-parallel sharding: labels[i] is the token
  that follows position i in the same document, or -100 at a document's last token, so no
  loss crosses a boundary.

transformers reads restarting position_ids without an attention mask as packed sequences
and keeps attention inside each document (sdpa and eager attention).

Resuming: every row of a text source (files or a dataset) carries where the next row starts,
`{"epoch", "record", "offset"}` (the record's index in that epoch's order, and how many of its
tokens are already packed), which the trainer saves with its checkpoint; a resumed run opens
the dataset at that record (`Dataset.select`, or `IterableDataset.skip` when streaming) and
tokenizes from there, so nothing consumed before is tokenized again. A document cut at a row's
end continues as a new segment, so packing its remainder alone gives the rows the
uninterrupted run had. Sources that cannot seek (the synthetic passkey stream; a streaming
dataset with a shuffle buffer, whose buffer `datasets` does not save) re-create the
deterministic stream and skip the rows read. Text is tokenized in batches (one fast-tokenizer
call each) that grow from FIRST_TOKENIZE_BATCH to TOKENIZE_BATCH records.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from longctx.errors import LongctxError
from longctx.labels import IGNORE_INDEX
from longctx.tasks.haystacks import DATASET_BUILDERS, dataset_errors
from longctx.train.config import DataConfig, resolve_data_files

MIN_HAYSTACK_TOKENS = 16  # the least haystack a synthetic passkey document holds
TOKENIZE_BATCH = 256  # records per tokenizer call, reached by doubling from FIRST_TOKENIZE_BATCH
FIRST_TOKENIZE_BATCH = 8  # so that the first row (after a resume too) waits for a few documents only


@dataclass
class Document:
    ids: list[int]
    targets: list[bool] | None = None  # targets[i]: whether token i is predicted (None: all are)
    where: tuple[int, int] | None = None  # (epoch, record) of a seekable source; ids start at `skipped`
    skipped: int = 0  # tokens of the record already packed before a resume (ids holds the rest)


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    next_start: dict | None = None  # where the row after this one starts, for a seekable source


def pack_documents(documents: Iterable[Document], seq_len: int) -> Iterator[PackedRow]:
    """Pack documents into rows of exactly seq_len tokens (see the module docstring)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for document in documents:
        start = 0
        while start < len(document.ids):
            room = seq_len - len(ids)
            piece = document.ids[start : start + room]
            targets = document.targets[start : start + room] if document.targets is not None else None
            ids.extend(piece)
            positions.extend(range(len(piece)))
            for i in range(len(piece)):
                is_target = i + 1 < len(piece) and (targets is None or targets[i + 1])
                labels.append(piece[i + 1] if is_target else IGNORE_INDEX)
            start += len(piece)
            if len(ids) == seq_len:
                yield PackedRow(ids, labels, positions, next_start(document, start))
                ids, labels, positions = [], [], []


def next_start(document: Document, packed: int) -> dict | None:
    """Where the stream continues after `packed` tokens of `document` (None: the source cannot seek)."""
    if document.where is None:
        return None
    epoch, record = document.where
    if packed < len(document.ids):
        return {"epoch": epoch, "record": record, "offset": document.skipped + packed}
    return {"epoch": epoch, "record": record + 1, "offset": 0}


def collate(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([row.input_ids for row in rows], dtype=torch.long),
        "labels": torch.tensor([row.labels for row in rows], dtype=torch.long),
        "position_ids": torch.tensor([row.position_ids for row in rows], dtype=torch.long),
    }


# --- sources ------------------------------------------------------------------------------


def passkey_documents(
    tokenizer, seq_len: int, *, seed: int, loss: str = "all", haystack: str = "noise", eos: bool = True,
    tasks: Sequence[str] = ("passkey",),
) -> Iterator[Document]:
    """Endless passkey documents, built with the needle test's own prompts, that fill rows of
    exactly seq_len tokens: one document of seq_len, or a few shorter ones (see row_lengths).

    Each is a `longctx needle --task passkey` prompt (instruction, haystack with the passkey
    planted at a random depth, question, answer prefix; raw text, no chat template, as the
    needle test's passkey prompts) followed by the answer and, with eos, the tokenizer's EOS.
    A model trained on it is measured by the same prompts and stops after the key (a sixth
    digit would spoil the needle test's first-integer match). loss="answer" makes only the
    answer and its EOS targets. Varying the length keeps a model from learning where the
    answer sits instead of where the key is: trained on one length only, a tiny model
    answered at that prompt length and at no other, not even a few tokens shorter.

    `tasks` names other `longctx needle --task`s (reverse, RULER's): each document is a prompt
    of one of them, drawn uniformly, in the prompt style the needle test gives that task.
    """
    from longctx.tasks.haystacks import build_haystack, encode
    from longctx.tasks.prompts import PromptBuilder, detect_style
    from longctx.tasks.retrieval import Task

    built = build_haystack(tokenizer, haystack, seq_len)
    end = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    builders, shortest = [], 0
    for task in (Task(name) for name in tasks):
        style = detect_style(tokenizer, "auto", task.name)  # as the needle test: raw text for passkey
        builder = PromptBuilder(tokenizer, built, task.instruction, style)
        probe_sample = task.sample(random.Random(0))
        probe = builder.build(probe_sample, seq_len, 0.0)
        fixed = len(probe.ids) - probe.haystack_tokens + len(encode(tokenizer, probe_sample.answer) + end)
        shortest = max(shortest, fixed + MIN_HAYSTACK_TOKENS)
        builders.append((task, builder))
    rng = random.Random(seed)
    while True:
        for length in row_lengths(rng, seq_len, shortest):
            # one task draws nothing: the stream stays the one passkey-only runs (and their resumes) had
            task, builder = builders[rng.randrange(len(builders))] if len(builders) > 1 else builders[0]
            sample = task.sample(rng)
            answer = encode(tokenizer, sample.answer) + end
            prompt = builder.build(sample, length - len(answer), rng.uniform(0.0, 100.0))
            ids = prompt.ids + answer
            targets = None if loss == "all" else [False] * len(prompt.ids) + [True] * len(answer)
            yield Document(ids, targets)


def row_lengths(rng: random.Random, seq_len: int, shortest: int) -> list[int]:
    """Lengths of the documents of one row, summing to seq_len, none below `shortest`: draw a
    length from [shortest, what is left] until what would be left is below shortest, then
    take it all (with shortest = seq_len / 3, about half the rows are one full-length document)."""
    lengths, left = [], seq_len
    while left:
        length = rng.randint(min(shortest, left), left)
        if left - length < shortest:
            length = left
        lengths.append(length)
        left -= length
    return lengths


def open_dataset(data: DataConfig):
    """The training data as a `datasets` dataset, after checking it has the text field."""
    import datasets

    if data.source == "files":
        files = resolve_data_files(data.paths)
        builder = DATASET_BUILDERS[files[0][files[0].rfind(".") :].lower()]
        load_args = (builder,)
        load_kwargs = {"data_files": files, "split": "train"}
    else:
        load_args = (data.name,)
        load_kwargs = {"split": data.split}
    try:
        dataset = datasets.load_dataset(*load_args, streaming=data.streaming, **load_kwargs)
    except dataset_errors() as error:
        raise LongctxError(f"cannot load training data {load_args[0]!r}: {str(error).splitlines()[0]}") from error
    columns = dataset.column_names or []
    if columns and data.text_field not in columns:
        raise LongctxError(f"training data has no column {data.text_field!r}; set data.text_field to one of {', '.join(columns)}")
    return dataset


def check_data_source(data: DataConfig) -> None:
    """Open the data source as training will (files found, dataset readable, text field there,
    passkey haystack readable), so that a bad one fails before the model is loaded."""
    from longctx.tasks.haystacks import load_haystack_text

    if data.source == "synthetic-passkey":
        load_haystack_text(data.passkey.haystack)
    else:
        open_dataset(data)


def text_documents(data: DataConfig, tokenizer, *, seed: int, resume_from: dict | None = None) -> Iterator[Document]:
    """Tokenized documents from local files (jsonl, parquet, text) or a hub dataset, through `datasets`.

    With data.streaming the files are read lazily (corpora larger than memory); otherwise
    they are loaded (memory-mapped Arrow) and shuffled with the seed. Each document ends
    with EOS when data.add_eos. `resume_from` ({"epoch", "record", "offset"}, a row's
    next_start) starts the stream there without reading what came before it.
    """
    dataset = open_dataset(data)
    if data.streaming:
        if data.shuffle_buffer:
            dataset = dataset.shuffle(seed=seed, buffer_size=data.shuffle_buffer)
    else:
        dataset = dataset.shuffle(seed=seed)
    seekable = not (data.streaming and data.shuffle_buffer)
    start = resume_from if seekable and resume_from else {"epoch": 0, "record": 0, "offset": 0}
    eos = [tokenizer.eos_token_id] if data.add_eos and tokenizer.eos_token_id is not None else []
    for epoch in itertools.count(start["epoch"]):
        if epoch and data.streaming and data.shuffle_buffer:
            dataset.set_epoch(epoch)
        first = start["record"] if epoch == start["epoch"] else 0
        offset = start["offset"] if epoch == start["epoch"] else 0
        if not first:
            records = dataset
        elif data.streaming:
            records = dataset.skip(first)
        elif first < len(dataset):
            records = dataset.select(range(first, len(dataset)))
        else:
            continue  # the resumed epoch was finished
        record, documents = first, 0
        for texts in _text_batches(records, data.text_field):
            encoded = tokenizer([text or "" for text in texts], add_special_tokens=True, verbose=False)["input_ids"]
            for text, ids in zip(texts, encoded):
                if text:
                    skip = offset if record == first else 0
                    documents += 1
                    yield Document((list(ids) + eos)[skip:], where=(epoch, record) if seekable else None, skipped=skip)
                record += 1
        if not documents and not first:
            raise LongctxError(f"training data has no non-empty {data.text_field!r} text; check data.paths")


def _text_batches(records, field: str) -> Iterator[list]:
    """The texts of `records` in batches of FIRST_TOKENIZE_BATCH, doubling up to TOKENIZE_BATCH."""
    size, batch = FIRST_TOKENIZE_BATCH, []
    for record in records:
        batch.append(record[field])
        if len(batch) == size:
            yield batch
            size, batch = min(2 * size, TOKENIZE_BATCH), []
    if batch:
        yield batch


def packed_rows(data: DataConfig, tokenizer, seq_len: int, *, seed: int, resume_from: dict | None = None) -> Iterator[PackedRow]:
    """The endless stream of packed rows of one stage (deterministic for a seed); `resume_from` (a
    row's next_start) starts a text source where that row left off."""
    if data.source == "synthetic-passkey":
        documents = passkey_documents(
            tokenizer, seq_len, seed=seed, loss=data.passkey.loss, haystack=data.passkey.haystack, eos=data.add_eos,
            tasks=data.passkey.tasks,
        )
    else:
        documents = text_documents(data, tokenizer, seed=seed, resume_from=resume_from)
    return pack_documents(documents, seq_len)


class BatchStream:
    """Batches of packed rows for one data-parallel rank, resumable by position.

    Rows are dealt round-robin to data-parallel ranks (row i goes to rank i % dp_size);
    the ranks of one sequence-parallel group read the same rows. `position` counts rows of
    the global stream consumed; `resume_point` is where the next row starts in a seekable
    source (None otherwise). A stream made at `position` skips that many rows, unless
    `rows` already starts there (`seeked`, rows from packed_rows(resume_from=...)).
    """

    def __init__(self, rows: Iterator[PackedRow], batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                 position: int = 0, seeked: bool = False):
        self.rows = rows
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.resume_point: dict | None = None
        self.position = 0
        if seeked:
            self.position = position
        else:
            self._skip(position)

    def _skip(self, count: int) -> None:
        for _ in range(count):
            self.resume_point = next(self.rows).next_start
        self.position = count

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size * self.dp_size):
            row = next(self.rows)
            if self.position % self.dp_size == self.dp_rank:
                rows.append(row)
            self.position += 1
            self.resume_point = row.next_start
        return collate(rows)
