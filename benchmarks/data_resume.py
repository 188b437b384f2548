"""Resuming a training data stream: seeking to the saved record against replaying the rows read, in one run.

Builds a files corpus of at least --tokens tokens (jsonl documents cut from the essays haystack,
seeded), then with the default model's tokenizer and seq_len 8192:
1. consumes half the corpus's rows from the start (what a run does before it is killed);
2. resumes there the way `longctx train --resume` does now (packed_rows(resume_from=the last row's
   next_start): the dataset opened at that record, nothing before it tokenized) and reads one row;
3. resumes by replay, as before (re-create the stream, skip the rows read), and reads one row.
Prints CPU seconds of each and checks that both resumes give the uninterrupted run's next row.

    .venv/bin/python benchmarks/data_resume.py --work /tmp/data-resume [--tokens 20000000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def build_corpus(path: Path, tokens: int, tokenizer) -> int:
    """jsonl documents of 200-4000 words cut from the essays haystack, until `tokens` tokens (counted)."""
    from longctx.tasks.haystacks import load_haystack_text

    if path.exists():
        return json.loads(path.with_suffix(".count").read_text())
    words = load_haystack_text("essays").split()
    rng = random.Random(0)
    total, lines = 0, []
    while total < tokens:
        batch = []
        for _ in range(512):
            size = rng.randrange(200, 4000)
            start = rng.randrange(0, len(words) - size)
            batch.append(" ".join(words[start : start + size]))
        total += sum(len(ids) for ids in tokenizer(batch)["input_ids"])
        lines += batch
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    path.with_suffix(".count").write_text(json.dumps(total))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--seq-len", type=int, default=8192)
    args = parser.parse_args()

    from longctx.models.reference import resolve_model
    from longctx.train.config import DataConfig
    from longctx.train.data import BatchStream, open_dataset, packed_rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    total = build_corpus(corpus, args.tokens, tokenizer)
    data = DataConfig(source="files", paths=[str(corpus)])
    half_rows = total // args.seq_len // 2
    open_dataset(data)  # datasets converts the jsonl to its Arrow cache once; every run after reads that

    started = time.process_time()
    stream = BatchStream(packed_rows(data, tokenizer, args.seq_len, seed=0), 1)
    for _ in range(half_rows):
        stream.next_batch()
    consume = time.process_time() - started
    resume_point = stream.resume_point
    expected = stream.next_batch()["input_ids"]

    started = time.process_time()
    seeked = BatchStream(packed_rows(data, tokenizer, args.seq_len, seed=0, resume_from=resume_point), 1,
                         position=half_rows, seeked=True)
    seek_row = seeked.next_batch()["input_ids"]
    seek = time.process_time() - started

    started = time.process_time()
    replayed = BatchStream(packed_rows(data, tokenizer, args.seq_len, seed=0), 1, position=half_rows)
    replay_row = replayed.next_batch()["input_ids"]
    replay = time.process_time() - started

    assert seek_row.equal(expected) and replay_row.equal(expected), "a resume did not give the uninterrupted row"
    print(f"corpus: {total:,} tokens, {corpus.stat().st_size / 2**20:.0f} MiB; "
          f"seq_len {args.seq_len}; half = {half_rows} rows")
    print("| step | CPU s | share of consuming the half |")
    print("|---|---:|---:|")
    print(f"| consume the first half | {consume:.2f} | 100% |")
    print(f"| resume by seeking (longctx train now) | {seek:.2f} | {100 * seek / consume:.1f}% |")
    print(f"| resume by replay (before) | {replay:.2f} | {100 * replay / consume:.1f}% |")
    print("both resumes give the uninterrupted run's next row")


if __name__ == "__main__":
    main()
