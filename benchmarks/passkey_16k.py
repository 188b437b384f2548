"""Issue #2 evidence: a 16K passkey test of the default model, unscaled and extended to 32K.

For each method M in linear, ntk, dynamic, yarn this runs
    longctx extend --model smollm2-135m --target-len 32768 --method M --output out/passkey16k/M
(once; an existing output is reused), then a passkey test at exactly 16,384 tokens (noise
haystack, chat prompt, greedy generation, exact match) at depths 0/50/100%, one probe each,
for the unscaled model and each extended one. SmolLM2-135M's native context is 8192.

Resumable and split into short steps: every probe is appended to the results file as it
finishes and skipped when run again, so the work can be done in several short invocations:

    for m in base linear ntk dynamic yarn; do for d in 50 0 100; do
        flock /tmp/longctx-heavy.lock timeout 720 .venv/bin/python benchmarks/passkey_16k.py --only $m --depth $d
    done; done
    .venv/bin/python benchmarks/passkey_16k.py --table

Prints a table: model, rope type, scores per depth, mean, seconds per probe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("base", "linear", "ntk", "dynamic", "yarn")
LENGTH = 16384
DEPTHS = (0.0, 50.0, 100.0)


def model_path(name: str, out_dir: Path) -> str:
    if name == "base":
        return "smollm2-135m"
    path = out_dir / name
    if not (path / "config.json").is_file():
        command = [str(ROOT / ".venv/bin/longctx"), "extend", "--model", "smollm2-135m", "--target-len", "32768",
                   "--method", name, "--output", str(path)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return str(path)


def run_model(name: str, out_dir: Path, results: Path, depths=DEPTHS) -> None:
    import torch

    from longctx.eval import Evaluator
    from longctx.models import load_model_and_tokenizer
    from longctx.rope.config import rope_settings
    from longctx.tasks.retrieval import Task

    done = {(r["model"], r["depth"]) for r in read_jsonl(results)}
    todo = [depth for depth in depths if (name, depth) not in done]
    if not todo:
        print(f"{name}: done already")
        return
    model, tokenizer = load_model_and_tokenizer(model_path(name, out_dir))
    kind = rope_settings(model.config.to_dict())["rope_parameters"]["rope_type"]
    evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=LENGTH, scoring="generate")
    for depth in todo:
        started = time.perf_counter()
        with torch.no_grad():
            cell = evaluator.evaluate(LENGTH, depth)
        row = dict(model=name, rope_type=kind, depth=depth, length=LENGTH, score=cell.score, answer=cell.answer,
                   expected=cell.expected, seconds=round(time.perf_counter() - started, 1),
                   processed_tokens=cell.processed_tokens, prefix_reuse=evaluator.prefix_reuse)
        with results.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table(results: Path) -> str:
    rows = read_jsonl(results)
    lines = ["| model | rope type | depth 0% | depth 50% | depth 100% | mean | s/probe | answers |",
             "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        mine = {r["depth"]: r for r in rows if r["model"] == name}
        if not mine:
            continue
        scores = [mine[d]["score"] if d in mine else None for d in DEPTHS]
        done = [s for s in scores if s is not None]
        mean = sum(done) / len(done)
        seconds = sum(r["seconds"] for r in mine.values()) / len(mine)
        answers = "; ".join(f"{r['answer'][:24]!r} (want {r['expected'][0]})" for r in mine.values())
        kind = next(iter(mine.values()))["rope_type"]
        cells = " | ".join("-" if s is None else f"{s:.0f}" for s in scores)
        lines.append(f"| {name} | {kind} | {cells} | {mean:.2f} | {seconds:.0f} | {answers} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=MODELS, help="run one model (default: all in turn)")
    parser.add_argument("--depth", type=float, choices=DEPTHS, help="run one probe depth (default: all three)")
    parser.add_argument("--table", action="store_true", help="print the table of what is done and exit")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "passkey16k")
    parser.add_argument("--results", type=Path, default=ROOT / "out" / "passkey16k" / "results.jsonl")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name in [args.only] if args.only else MODELS:
            run_model(name, args.out_dir, args.results, [args.depth] if args.depth is not None else DEPTHS)
    print(table(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
