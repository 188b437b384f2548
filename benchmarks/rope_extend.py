"""Benchmark: `longctx extend` against the usual recipe (transformers load, edit config, save_pretrained).

Both run as fresh processes, as a user runs them; for each we report wall time, peak
resident memory of the process (wait4's ru_maxrss) and the disk space the output newly
takes (hard-linked files take none). Then `longctx extend` alone on a Llama-3-8B-shaped
model (real config, real tensor names and shapes, 16 GB of sparse bf16 shards): the
peer would need to read and rewrite all 16 GB, which this shared machine cannot hold.

    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/rope_extend.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import run_measured

REPO = Path(__file__).resolve().parent.parent

PEER_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source, output, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
original = model.config.max_position_embeddings
model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": model.config.rope_parameters["rope_theta"],
                                "factor": target / original, "original_max_position_embeddings": original}
model.config.max_position_embeddings = target
model.save_pretrained(output)
tokenizer = AutoTokenizer.from_pretrained(source)
tokenizer.model_max_length = target
tokenizer.save_pretrained(output)
"""


def new_disk_bytes(output: Path, source: Path) -> int:
    """Disk blocks of files in output that are not hard links to files in source."""
    source_inodes = {entry.stat().st_ino for entry in source.iterdir() if entry.is_file()}
    return sum(entry.stat().st_blocks * 512 for entry in output.iterdir()
               if entry.is_file() and entry.stat().st_ino not in source_inodes)


def measure(name: str, make_command, source: Path, work: Path, repeats: int) -> dict:
    times, peaks = [], []
    disk = 0
    for repeat in range(repeats):
        output = work / f"{name}-{repeat}"
        elapsed, peak = run_measured(make_command(output))
        times.append(elapsed)
        peaks.append(peak)
        disk = new_disk_bytes(output, source)
        shutil.rmtree(output)
    return {"name": name, "seconds": statistics.median(times), "all_seconds": times,
            "peak_rss": max(peaks), "disk": disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-8b", action="store_true", help="skip the Llama-3-8B-shaped run")
    args = parser.parse_args()

    from longctx.models import resolve_model

    source = resolve_model(args.model)
    weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    longctx = [sys.executable, "-m", "longctx"]
    with tempfile.TemporaryDirectory(dir=source.parent if os.access(source.parent, os.W_OK) else None) as tmp:
        work = Path(tmp)
        ours = measure(
            "longctx extend",
            lambda out: longctx + ["extend", "--model", str(source), "--target-len", str(args.target_len),
                                   "--method", "yarn", "--output", str(out)],
            source, work, args.repeats,
        )
        peer = measure(
            "transformers load + save_pretrained",
            lambda out: [sys.executable, "-c", PEER_SCRIPT, str(source), str(out), str(args.target_len)],
            source, work, args.repeats,
        )
        mb = 1e6
        print(f"model: {args.model} ({weights / mb:.0f} MB of weights), target {args.target_len}, yarn, "
              f"median of {args.repeats} runs, fresh process each")
        print("| tool | wall s (median) | runs | peak RSS MB | new disk MB |")
        print("|---|---|---|---|---|")
        for row in (ours, peer):
            runs = ", ".join(f"{t:.2f}" for t in row["all_seconds"])
            print(f"| {row['name']} | {row['seconds']:.2f} | {runs} | {row['peak_rss'] / mb:.0f} | {row['disk'] / mb:.1f} |")
        print(f"ratio peer/longctx: time {peer['seconds'] / ours['seconds']:.1f}x, "
              f"peak memory {peer['peak_rss'] / ours['peak_rss']:.1f}x, "
              f"disk {peer['disk'] / max(ours['disk'], 1):.0f}x")

        if not args.skip_8b:
            sys.path.insert(0, str(REPO / "tests"))
            from test_extend import make_llama3_8b_shaped

            big = make_llama3_8b_shaped(work / "llama3-8b-shaped")
            big_weights = sum(p.stat().st_size for p in big.glob("*.safetensors"))
            row = measure(
                "longctx extend (8B-shaped)",
                lambda out: longctx + ["extend", "--model", str(big), "--target-len", "1M", "--method", "scaling-law",
                                       "--output", str(out)],
                big, work, args.repeats,
            )
            print()
            print(f"Llama-3-8B-shaped: {big_weights / 1e9:.1f} GB of bf16 shards (sparse), target 1M, scaling-law")
            runs = ", ".join(f"{t:.2f}" for t in row["all_seconds"])
            print(f"| longctx extend | {row['seconds']:.2f} s (runs {runs}) | peak RSS {row['peak_rss'] / mb:.0f} MB "
                  f"| new disk {row['disk'] / mb:.2f} MB |")


if __name__ == "__main__":
    main()
