"""Packing keeps document boundaries; sources are deterministic and resumable by position."""

import json
import random

import pytest
from conftest import make_tokenizer

from longctx.errors import LongctxError
from longctx.labels import IGNORE_INDEX
from longctx.train.config import DataConfig
from longctx.train.data import (
    BatchStream, Document, pack_documents, packed_rows, passkey_documents, row_lengths,
)


def test_packing_restarts_positions_and_never_predicts_across_a_boundary():
    docs = [Document([10, 11, 12]), Document([20, 21]), Document([30, 31, 32, 33, 34]), Document([40])]
    rows = list(pack_documents(iter(docs), 4))
    assert [r.input_ids for r in rows] == [[10, 11, 12, 20], [21, 30, 31, 32]]  # the tail (33 34 40) waits for more
    first, second = rows
    assert first.position_ids == [0, 1, 2, 0]
    assert first.labels == [11, 12, IGNORE_INDEX, IGNORE_INDEX]  # 12 -> 20 crosses a boundary; 20 -> 21 crosses a row
    assert second.position_ids == [0, 0, 1, 2]  # 21 continues doc 2 in a new row: a new segment
    assert second.labels == [IGNORE_INDEX, 31, 32, IGNORE_INDEX]


def test_packing_keeps_only_target_tokens_as_labels():
    rows = list(pack_documents(iter([Document([1, 2, 3, 4], targets=[False, False, True, True])]), 4))
    assert rows[0].labels == [IGNORE_INDEX, 3, 4, IGNORE_INDEX]


def test_packed_rows_attend_within_documents_only(tiny_llama):
    """Restarting position_ids make transformers keep attention inside each document: the
    second document's logits equal those of the document alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    row = next(pack_documents(iter([Document(list(range(5, 25))), Document(list(range(40, 52)))]), 32))
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([row.input_ids]), position_ids=torch.tensor([row.position_ids]), use_cache=False).logits
        alone = model(input_ids=torch.tensor([list(range(40, 52))])).logits
    torch.testing.assert_close(packed[0, 20:], alone[0], atol=1e-5, rtol=1e-4)


def test_passkey_documents_are_needle_prompts_with_the_answer_filling_rows():
    """Documents of varied lengths (the answer must not sit at one position), each a whole
    needle prompt + answer + EOS, filling rows of seq_len exactly: packing never cuts one."""
    tokenizer = make_tokenizer()
    seq_len = 900  # the byte-level prompt's fixed parts take about 280 tokens
    documents = passkey_documents(tokenizer, seq_len, seed=3, loss="answer")
    lengths, filled = set(), 0
    for _ in range(12):
        document = next(documents)
        lengths.add(len(document.ids))
        filled = (filled + len(document.ids)) % seq_len
        assert document.ids[-1] == tokenizer.eos_token_id  # the model learns to stop after the key
        text = tokenizer.decode(document.ids, skip_special_tokens=True)
        key = text.split("The pass key is ")[1][:5]
        assert text.startswith("There is an important info hidden") and key.isdigit()
        assert text.endswith(f"\nWhat is the pass key? The pass key is {key}")
        answer = tokenizer.decode([t for t, target in zip(document.ids, document.targets) if target])
        assert answer == f" {key}{tokenizer.eos_token}"
    assert len(lengths) > 3 and max(lengths) <= seq_len and filled == 0
    for row in pack_documents(passkey_documents(tokenizer, seq_len, seed=3), seq_len):
        ends = [i - 1 for i, position in enumerate(row.position_ids) if position == 0 and i] + [seq_len - 1]
        assert all(row.input_ids[i] == tokenizer.eos_token_id for i in ends)
        if len(ends) > 2:
            break
    again = passkey_documents(tokenizer, seq_len, seed=3, loss="answer")
    assert next(again).ids == next(passkey_documents(tokenizer, seq_len, seed=3)).ids


def test_other_needle_tasks_make_documents_of_their_own_prompts_with_answer_only_targets():
    """tasks=[reverse, passkey]: each document is one task's needle prompt, both kinds occur, and
    a reverse document's targets are exactly the digits it hid, backwards, and EOS."""
    tokenizer = make_tokenizer()
    seq_len = 900
    documents = passkey_documents(tokenizer, seq_len, seed=2, loss="answer", tasks=["reverse", "passkey"])
    kinds = []
    for _ in range(16):
        document = next(documents)
        text = tokenizer.decode(document.ids, skip_special_tokens=True)
        answer = tokenizer.decode([t for t, target in zip(document.ids, document.targets) if target])
        if text.startswith("There is a list of digits hidden"):
            digits = text.split("The list is ")[1].split(".")[0].split(" ")
            assert answer == " " + " ".join(reversed(digits)) + tokenizer.eos_token
            assert text.endswith("\nWhat is the list backwards? The list backwards is" + answer[: -len(tokenizer.eos_token)])
            kinds.append("reverse")
        else:
            assert text.startswith("There is an important info hidden") and answer[1:6].isdigit()
            kinds.append("passkey")
    assert 4 <= kinds.count("reverse") <= 12
    only_passkey = passkey_documents(tokenizer, seq_len, seed=2, tasks=["passkey"])
    assert next(only_passkey).ids == next(passkey_documents(tokenizer, seq_len, seed=2)).ids


def test_row_lengths_fill_the_row_with_documents_no_shorter_than_asked():
    rng = random.Random(0)
    rows = [row_lengths(rng, 1024, 100) for _ in range(300)]
    assert all(sum(row) == 1024 and min(row) >= 100 for row in rows)
    assert {len(row) for row in rows} >= {1, 2, 3} and sum(len(row) == 1 for row in rows) > 30
    assert row_lengths(rng, 50, 100) == [50]  # shorter than asked: one document (the builder then says so)


def test_answer_loss_puts_targets_exactly_on_the_answer_tokens():
    """loss="answer": the only labels of a packed row are each document's pass key tokens
    (" " + 5 digits) and the EOS after them, each predicted from the token before it; the
    instruction, haystack, needle, question and answer prefix carry no loss."""
    tokenizer = make_tokenizer()
    seq_len = 900
    rows = pack_documents(passkey_documents(tokenizer, seq_len, seed=5, loss="answer"), seq_len)
    documents_seen = 0
    for row in (next(rows) for _ in range(6)):
        starts = [i for i, position in enumerate(row.position_ids) if position == 0] + [seq_len]
        expected_labelled = []
        for start, end in zip(starts, starts[1:]):
            key = tokenizer.decode(row.input_ids[start:end], skip_special_tokens=True).split("The pass key is ")[-1]
            answer_ids = tokenizer(f" {key}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert key.isdigit() and len(key) == 5 and len(answer_ids) == 7
            assert row.input_ids[end - 7 : end] == answer_ids
            assert [row.labels[i] for i in range(end - 8, end - 1)] == answer_ids
            expected_labelled += range(end - 8, end - 1)
            documents_seen += 1
        assert [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX] == expected_labelled
    assert documents_seen > 6  # some rows hold several documents
    everything = next(pack_documents(passkey_documents(tokenizer, seq_len, seed=5, loss="all"), seq_len))
    eos = tokenizer.eos_token_id  # loss="all": every next token within a document, none across
    assert everything.labels == [IGNORE_INDEX if token == eos else following
                                 for token, following in zip(everything.input_ids, everything.input_ids[1:] + [eos])]
    no_eos = next(passkey_documents(tokenizer, seq_len, seed=5, loss="answer", eos=False))
    assert tokenizer.decode(no_eos.ids).split("The pass key is ")[-1].isdigit() and sum(no_eos.targets) == 6


@pytest.mark.parametrize("fmt", ["jsonl", "text", "parquet"])
def test_file_sources_pack_documents_with_eos(tmp_path, fmt):
    tokenizer = make_tokenizer()
    texts = [f"document number {i} " * (i + 1) for i in range(6)]
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
        field = "body"
    elif fmt == "text":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(texts) + "\n")
        field = "text"
    else:
        import datasets

        path = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
        field = "text"
    for streaming in (False, True):
        data = DataConfig(source="files", paths=[str(path)], text_field=field, streaming=streaming)
        rows = packed_rows(data, tokenizer, 64, seed=0)
        seen = [next(rows) for _ in range(8)]
        eos = tokenizer.eos_token_id
        for row in seen:
            for i, token in enumerate(row.input_ids[:-1]):
                if token == eos:  # a document ends here: the next position restarts, no label crosses
                    assert row.position_ids[i + 1] == 0 and row.labels[i] == IGNORE_INDEX
        decoded = tokenizer.decode([t for r in seen for t in r.input_ids if t != eos])
        assert "document number" in decoded


def test_missing_column_and_files_are_clear_errors(tmp_path):
    tokenizer = make_tokenizer()
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(LongctxError, match="no column 'text'"):
        next(packed_rows(DataConfig(source="files", paths=[str(path)]), tokenizer, 16, seed=0))
    with pytest.raises(LongctxError, match="matches no file"):
        next(packed_rows(DataConfig(source="files", paths=[str(tmp_path / "*.parquet")]), tokenizer, 16, seed=0))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": not json\n')
    with pytest.raises(LongctxError, match="cannot load training data"):  # one line, not datasets' traceback
        next(packed_rows(DataConfig(source="files", paths=[str(broken)]), tokenizer, 16, seed=0))


def test_batch_stream_resumes_by_position_and_deals_rows_to_data_parallel_ranks():
    tokenizer = make_tokenizer()

    def rows():
        return packed_rows(DataConfig(), tokenizer, 300, seed=1)

    whole = BatchStream(rows(), 2)
    batches = [whole.next_batch() for _ in range(3)]
    resumed = BatchStream(rows(), 2, position=4)
    assert resumed.next_batch()["input_ids"].equal(batches[2]["input_ids"])
    rank0, rank1 = BatchStream(rows(), 1, dp_rank=0, dp_size=2), BatchStream(rows(), 1, dp_rank=1, dp_size=2)
    assert rank0.next_batch()["input_ids"][0].equal(batches[0]["input_ids"][0])
    assert rank1.next_batch()["input_ids"][0].equal(batches[0]["input_ids"][1])
    assert rank0.position == rank1.position == 2


class CountingTokenizer:
    """The test tokenizer, counting the texts it tokenizes (to show a resume reads nothing again)."""

    def __init__(self):
        self.inner, self.texts = make_tokenizer(), 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts) if isinstance(texts, list) else 1
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def corpus(tmp_path, records=700):
    rng = random.Random(0)
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "" if i % 97 == 5 else " ".join(f"w{i}-{j}" for j in range(rng.randrange(1, 60)))})
             for i in range(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_seeks_to_the_row_and_gives_the_uninterrupted_rows(tmp_path, streaming):
    """Rows after a resume at row k (its next_start) equal rows k+1... of one uninterrupted stream,
    across a cut document, an empty record and an epoch boundary; the resume tokenizes at most one
    batch of records more than it yields."""
    data = DataConfig(source="files", paths=[str(corpus(tmp_path, 150))], streaming=streaming)
    whole = packed_rows(data, make_tokenizer(), 96, seed=3)
    rows = [next(whole) for _ in range(700)]  # past one epoch
    epochs = {row.next_start["epoch"] for row in rows}
    assert {0, 1} <= epochs
    assert any(row.next_start["offset"] for row in rows)  # rows that end inside a document
    first_of_epoch_1 = next(k for k, row in enumerate(rows) if row.next_start["epoch"] == 1)
    for k in (0, 17, 300, first_of_epoch_1 - 1, first_of_epoch_1, 650):
        tokenizer = CountingTokenizer()
        resumed = packed_rows(data, tokenizer, 96, seed=3, resume_from=rows[k].next_start)
        again = [next(resumed) for _ in range(5)]
        assert [r.input_ids for r in again] == [r.input_ids for r in rows[k + 1 : k + 6]]
        assert [r.labels for r in again] == [r.labels for r in rows[k + 1 : k + 6]]
        assert [r.position_ids for r in again] == [r.position_ids for r in rows[k + 1 : k + 6]]
        assert [r.next_start for r in again] == [r.next_start for r in rows[k + 1 : k + 6]]  # a resume of a resume
        assert tokenizer.texts <= 2 * 256  # one or two tokenizer batches, not the records before the resume point


def test_a_streaming_shuffle_buffer_cannot_seek_and_resumes_by_replay(tmp_path):
    data = DataConfig(source="files", paths=[str(corpus(tmp_path, 100))], streaming=True, shuffle_buffer=16)
    rows = packed_rows(data, make_tokenizer(), 64, seed=0)
    assert next(rows).next_start is None
    whole = BatchStream(packed_rows(data, make_tokenizer(), 64, seed=0), 2)
    batches = [whole.next_batch() for _ in range(3)]
    assert whole.resume_point is None
    resumed = BatchStream(packed_rows(data, make_tokenizer(), 64, seed=0), 2, position=4)
    assert resumed.next_batch()["input_ids"].equal(batches[2]["input_ids"])


def test_batch_stream_seeked_equals_batch_stream_skipped(tmp_path):
    data = DataConfig(source="files", paths=[str(corpus(tmp_path, 200))])
    tokenizer = make_tokenizer()
    whole = BatchStream(packed_rows(data, tokenizer, 80, seed=1), 2, dp_rank=1, dp_size=2)
    batches = [whole.next_batch() for _ in range(4)]
    point = BatchStream(packed_rows(data, tokenizer, 80, seed=1), 2, dp_rank=1, dp_size=2, position=8)
    seeked = BatchStream(packed_rows(data, tokenizer, 80, seed=1, resume_from=point.resume_point), 2,
                         dp_rank=1, dp_size=2, position=8, seeked=True)
    for expected in batches[2:]:
        assert seeked.next_batch()["input_ids"].equal(expected["input_ids"])
    assert seeked.position == whole.position == 16
