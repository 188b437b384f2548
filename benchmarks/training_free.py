"""Long context without training on one model: every method's passkey score in one table.

    python benchmarks/training_free.py run --lengths 16k,32k --samples 2 --work out/training-free
    python benchmarks/training_free.py table --work out/training-free

`run` extends the model for each length with each method (config only; Self-Extend's G and W
from its rule for that length), then runs `longctx needle --task passkey` over 5 depths x
--samples keys on each, through the CLI, resumable (a finished model or needle run is kept).
`table` prints one row per method, one column per length (mean passkey score, with the number
of prompts), from the needle runs' summary.json files. benchmarks/gpu/training_free.sh runs it on
a GPU; the CPU table in RESULTS.md comes from the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from longctx.units import length_label, parse_token_count

# (row name, extend flags or None for the model as it is)
METHODS = {
    "unscaled": None,
    "ntk": ["--method", "ntk"],
    "yarn": ["--method", "yarn"],
    "yarn, attention factor 1": ["--method", "yarn", "--attention-factor", "1"],
    "dynamic (as generate runs it)": ["--method", "dynamic"],
    "self-extend": ["--method", "self-extend"],
    "ntk + self-extend": ["--method", "ntk", "--self-extend"],
}


def slug(name: str) -> str:
    """'ntk + self-extend' -> 'ntk-self-extend'; 'dynamic (as generate runs it)' -> 'dynamic'."""
    return re.sub(r"[^a-z0-9]+", "-", name.split(" (")[0].lower()).strip("-")


def longctx(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "longctx", *args], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run(args) -> None:
    work = Path(args.work)
    for length in (length_label(parse_token_count(text)) for text in args.lengths.split(",")):
        for name in args.methods.split(",") if args.methods else METHODS:
            flags = METHODS[name]
            model = args.model
            if flags is not None:
                model = str(work / "models" / f"{slug(name)}-{length}")
                if not Path(model).exists():
                    longctx("extend", "--model", args.model, "--target-len", length, *flags, "--output", model)
            needle = work / "needle" / f"{slug(name)}-{length}"
            resume = ["--resume"] if needle.exists() else []
            longctx("needle", "--model", model, "--task", "passkey", "--lengths", length, "--num-depths", "5",
                    "--samples", str(args.samples), "--device", args.device,
                    "--output", str(needle), *resume)


def table(args) -> str:
    work = Path(args.work)
    runs = {}
    for summary_path in sorted((work / "needle").glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        runs[summary_path.parent.name] = summary
    lengths = sorted({L for summary in runs.values() for L in summary["lengths"]})
    lines = ["| method | " + " | ".join(f"passkey @ {length_label(L)}" for L in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name in METHODS:
        cells = []
        for L in lengths:
            summary = runs.get(f"{slug(name)}-{length_label(L)}")
            if summary is None:
                cells.append("")
                continue
            score = summary["per_length"][str(L)]
            cells.append(f"{score:.2f} ({summary['samples_done']})" if score is not None else "")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--model", default="smollm2-135m")
    run_parser.add_argument("--lengths", default="16k,32k")
    run_parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    run_parser.add_argument("--samples", type=int, default=2)
    run_parser.add_argument("--device", default="auto")
    run_parser.add_argument("--work", required=True)
    table_parser = commands.add_parser("table")
    table_parser.add_argument("--work", required=True)
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    print(table(args))


if __name__ == "__main__":
    main()
