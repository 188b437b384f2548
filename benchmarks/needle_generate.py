"""A needle grid answered by a plain `model.generate`, cell by cell, beside `longctx needle`'s own run.

`run` builds every cell's prompt exactly as the harness does (the same task, haystack, prompt
style, seed and needle values: longctx.tasks' builders and eval/runner.py's sample_rng), loads the
model with stock transformers (AutoModelForCausalLM, sdpa, float32; none of longctx's engine:
one prefill pass of the whole prompt, no prefix reuse, no chunks, no draft), generates greedily
with the harness's budget (the expected answer's tokens + 8), keeps the first line as the harness
does and scores it with the harness's rule. Resumable: cells already in --output are skipped.

`table` puts the two side by side per length: mean score, cells whose scores agree, cells whose
greedy answers agree (the harness's is where generate's starts: it stops as soon as more tokens
cannot change the score), seconds.
It fails (exit 1) unless both sides have every cell of the grid.

    python benchmarks/needle_generate.py run --model DIR --lengths 16k,32k,64k --depths 0,25,50,75,100 \\
        --samples 2 --device cuda --output WORK/generate.jsonl
    python benchmarks/needle_generate.py table --harness WORK/harness --generate WORK/generate.jsonl
(benchmarks/gpu/needle.sh runs both after `longctx extend` and `longctx needle`.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import read_jsonl


def cell_key(row: dict) -> tuple[int, float, int]:
    return int(row["length"]), float(row["depth"]), int(row["sample"])


def run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.eval.runner import EXTRA_NEW_TOKENS, sample_rng
    from longctx.eval.scoring import score_answer
    from longctx.tasks.haystacks import build_haystack, encode
    from longctx.tasks.prompts import PromptBuilder, detect_style
    from longctx.tasks.retrieval import Task
    from longctx.units import parse_token_count

    lengths = sorted({parse_token_count(text) for text in args.lengths.split(",")})
    depths = sorted({float(text) for text in args.depths.split(",")})
    cells = [(length, depth, index) for length in lengths for depth in depths for index in range(args.samples)]
    output = Path(args.output)
    done = {cell_key(row) for row in read_jsonl(output)}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    task = Task(args.task)
    builder = PromptBuilder(tokenizer, build_haystack(tokenizer, args.haystack, max(lengths)), task.instruction,
                            detect_style(tokenizer, "auto", task.name))
    for length, depth, index in cells:
        if (length, depth, index) in done:
            continue
        sample = task.sample(sample_rng(args.seed, length, depth, index))
        prompt = builder.build(sample, length, depth)
        budget = len(encode(tokenizer, sample.answer)) + EXTRA_NEW_TOKENS
        ids = torch.tensor([prompt.ids], device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        text = tokenizer.decode(generated[0, len(prompt.ids):], skip_special_tokens=True).strip()
        answer = text.split("\n")[0].strip()
        row = {"length": length, "depth": depth, "sample": index, "answer": answer, "expected": sample.expected,
               "score": float(score_answer(sample, answer)), "seconds": round(seconds, 3)}
        with output.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table(args) -> None:
    harness_dir = Path(args.harness)
    summary = json.loads((harness_dir / "summary.json").read_text())
    harness = {cell_key(row): row for row in read_jsonl(harness_dir / "results.jsonl")}
    generate = {cell_key(row): row for row in read_jsonl(Path(args.generate))}
    planned = {(length, float(depth), index) for length in summary["lengths"] for depth in summary["depths"]
               for index in range(summary["samples_per_cell"])}
    for name, rows in (("longctx needle", harness), ("model.generate", generate)):
        missing = planned - rows.keys()
        if missing:
            raise SystemExit(f"{name} lacks {len(missing)} of the {len(planned)} cells (e.g. {sorted(missing)[0]}); "
                             "rerun its step")
    differ = [key for key in sorted(planned) if harness[key]["expected"] != generate[key]["expected"]]
    if differ:
        raise SystemExit(f"the two sides hid different needles in {len(differ)} cells (e.g. {differ[0]}): not the same "
                         "prompts; run both with the same task, haystack and seed")
    print("| length | cells | longctx needle score | model.generate score | scores agree | same greedy answer | "
          "longctx needle s | model.generate s |")
    print("|---|---|---|---|---|---|---|---|")
    for length in summary["lengths"]:
        keys = sorted(key for key in planned if key[0] == length)
        ours, theirs = [harness[key] for key in keys], [generate[key] for key in keys]
        agree = sum(a["score"] == b["score"] for a, b in zip(ours, theirs))
        same = sum(b["answer"].startswith(a["answer"]) for a, b in zip(ours, theirs))
        print(f"| {length} | {len(keys)} | {sum(r['score'] for r in ours) / len(keys):.2f} | "
              f"{sum(r['score'] for r in theirs) / len(keys):.2f} | {agree}/{len(keys)} | {same}/{len(keys)} | "
              f"{sum(r['seconds'] for r in ours):.1f} | {sum(r['seconds'] for r in theirs):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--model", required=True)
    runner.add_argument("--lengths", required=True)
    runner.add_argument("--depths", default="0,25,50,75,100")
    runner.add_argument("--samples", type=int, default=1)
    runner.add_argument("--task", default="passkey")
    runner.add_argument("--haystack", default="noise")
    runner.add_argument("--seed", type=int, default=0)
    runner.add_argument("--device", default="cuda")
    runner.add_argument("--output", required=True)
    tabler = commands.add_parser("table")
    tabler.add_argument("--harness", required=True, help="the longctx needle output directory")
    tabler.add_argument("--generate", required=True, help="run's --output")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
