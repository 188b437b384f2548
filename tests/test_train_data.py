"""Packing keeps document boundaries; sources are deterministic and resumable by position."""

import json

import pytest
from conftest import make_tokenizer

from longctx.errors import LongctxError
from longctx.train.config import DataConfig
from longctx.train.data import IGNORE_INDEX, BatchStream, Document, pack_documents, packed_rows, passkey_documents


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


def test_passkey_documents_are_needle_prompts_with_the_answer():
    tokenizer = make_tokenizer()
    documents = passkey_documents(tokenizer, 400, seed=3, loss="answer")
    for _ in range(3):
        document = next(documents)
        assert len(document.ids) == 400
        text = tokenizer.decode(document.ids)
        key = text.split("The pass key is ")[1][:5]
        assert key.isdigit() and text.rstrip(".").endswith(f"The pass key is {key}") and "What is the pass key?" in text
        answer = tokenizer.decode([t for t, target in zip(document.ids, document.targets) if target])
        assert answer.strip(" .") == key
    again = passkey_documents(tokenizer, 400, seed=3, loss="answer")
    assert next(again).ids == next(passkey_documents(tokenizer, 400, seed=3)).ids


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
