"""Needle grid throughput: haystack-prefix KV reuse vs from-scratch prefill, and teacher forcing vs generation.

The same passkey grid (default model, noise haystack, chat prompt) is run three ways:
  reuse    prefix KV cache reused across depths and lengths, greedy generation (longctx's default)
  scratch  every prompt prefilled from scratch (--no-prefix-reuse; what gkamradt/RULER/EasyContext do)
  teacher  prefix reuse + one teacher-forced pass per cell instead of generation (EasyContext's scoring)
and prints cells/hour, the speed-up of reuse over scratch against the bound of the issue
(prefill work falls from D full prompts per length to about 1 + sum(1 - d): with several
lengths on one haystack, to L_max + sum_L L * sum_d (1 - d) tokens), and whether the scores
are identical.

Each part is resumable (results in --results, one JSON line per cell) so the parts can be run
in separate short invocations under the heavy-run lock:
    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/needle.py --part reuse
    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/needle.py --part scratch
    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/needle.py --part teacher
    .venv/bin/python benchmarks/needle.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"reuse": (True, "generate"), "scratch": (False, "generate"), "teacher": (True, "teacher-forced")}
LENGTHS = (512, 1024)
DEPTHS = tuple(float(d) for d in range(0, 101, 10))  # 11 depths


def run_part(part: str, results: Path, lengths, depths) -> None:
    from longctx.eval import Evaluator
    from longctx.eval.tasks import Task
    from longctx.models import load_model_and_tokenizer

    done = {(r["length"], r["depth"]) for r in read_jsonl(results) if r["part"] == part}
    todo = [(L, d) for L in lengths for d in depths if (L, d) not in done]
    if not todo:
        return
    if done:  # a resumed part would not pay for its prefix again: start the part over for honest timings
        rows = [r for r in read_jsonl(results) if r["part"] != part]
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
        todo = [(L, d) for L in lengths for d in depths]
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    reuse, scoring = PARTS[part]
    evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=max(lengths), prefix_reuse=reuse, scoring=scoring)
    for length, depth in todo:
        clean_before = evaluator.prefix.tokens_processed
        started = time.perf_counter()
        cell = evaluator.evaluate(length, depth)
        row = dict(part=part, length=length, depth=depth, score=cell.score, answer=cell.answer,
                   seconds=round(time.perf_counter() - started, 3),
                   tokens=cell.processed_tokens + evaluator.prefix.tokens_processed - clean_before)
        with results.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def report(results: Path, lengths, depths) -> str:
    rows = read_jsonl(results)
    by_part = {part: [r for r in rows if r["part"] == part] for part in PARTS}
    cells = len(lengths) * len(depths)
    fractions = [1 - d / 100 for d in depths]
    scratch_work = len(depths) * sum(lengths)
    reuse_work = max(lengths) + sum(lengths) * sum(fractions)
    bound = scratch_work / reuse_work
    lines = [
        f"grid: passkey, lengths {list(lengths)}, {len(depths)} depths (0-100), 1 sample per cell = {cells} cells",
        "",
        "| run | cells done | total s | cells/hour | prompt tokens processed | mean score |",
        "|---|---|---|---|---|---|",
    ]
    totals = {}
    for part, part_rows in by_part.items():
        if not part_rows:
            continue
        seconds = sum(r["seconds"] for r in part_rows)
        tokens = sum(r["tokens"] for r in part_rows)
        totals[part] = (seconds, tokens, len(part_rows))
        mean = sum(r["score"] for r in part_rows) / len(part_rows)
        lines.append(f"| {part} | {len(part_rows)} | {seconds:.0f} | {3600 * len(part_rows) / seconds:.0f} | {tokens} | {mean:.3f} |")
    lines.append("")
    if "reuse" in totals and "scratch" in totals and totals["reuse"][2] == totals["scratch"][2] == cells:
        speedup = totals["scratch"][0] / totals["reuse"][0]
        work = totals["scratch"][1] / totals["reuse"][1]
        same = {(r["length"], r["depth"]): (r["score"], r["answer"]) for r in by_part["reuse"]} == {
            (r["length"], r["depth"]): (r["score"], r["answer"]) for r in by_part["scratch"]
        }
        lines += [
            f"reuse vs scratch: {speedup:.2f}x faster (wall clock); prefill work {work:.2f}x less "
            f"(bound {bound:.2f}x = {scratch_work} / {reuse_work:.0f} tokens); speed-up = {100 * speedup / bound:.0f}% of the bound",
            f"scores and answers identical: {same}",
        ]
    if "teacher" in totals and "reuse" in totals and totals["teacher"][2] == totals["reuse"][2] == cells:
        agree = sum(
            a["score"] == b["score"]
            for a, b in zip(sorted(by_part["teacher"], key=lambda r: (r["length"], r["depth"])),
                            sorted(by_part["reuse"], key=lambda r: (r["length"], r["depth"])))
        )
        lines.append(
            f"teacher-forced vs generation: {totals['reuse'][0] / totals['teacher'][0]:.2f}x faster; "
            f"same score in {agree}/{cells} cells"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=list(PARTS), action="append", help="run these parts (default: all)")
    parser.add_argument("--report", action="store_true", help="only print the report")
    parser.add_argument("--results", type=Path, default=ROOT / "out" / "needle-bench" / "results.jsonl")
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for part in args.part or list(PARTS):
            run_part(part, args.results, LENGTHS, DEPTHS)
    print(report(args.results, LENGTHS, DEPTHS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
