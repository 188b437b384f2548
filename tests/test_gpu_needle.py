"""benchmarks/gpu/needle.sh's parts on the CPU with tiny sizes: extend, the harness grid, a plain
model.generate per cell, the table; and that a broken part stops it with an error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def run_script(model, work, **extra):
    env = {**os.environ, "PY": sys.executable, "MODEL": str(model), "TARGET": "512", "LENGTHS": "300,400",
           "DEPTHS": "0,100", "SAMPLES": "1", "DEVICE": "cpu", "WORK": str(work), "PYTHONPATH": str(ROOT), **extra}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu/needle.sh")], env=env, capture_output=True, text=True,
                          timeout=300)


def test_gpu_needle_script_runs_its_chain_on_a_tiny_model_and_stops_on_a_broken_part(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=128)
    work = tmp_path / "run"
    result = run_script(model, work)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "run.md").read_text().splitlines()
    assert table[0].startswith("| length | cells | longctx needle score | model.generate score | scores agree | same greedy answer")
    rows = [line.split("|")[1:-1] for line in table[2:4]]
    assert [row[0].strip() for row in rows] == ["300", "400"] and all(row[1].strip() == "2" for row in rows)
    assert all(row[4].strip() == row[5].strip() == "2/2" for row in rows)  # the same scores and greedy answers
    assert '"rope_theta"' in (work / "model" / "config.json").read_text()

    # a part that breaks stops the script: a cell missing from generate's side makes the table refuse
    lines = (work / "generate.jsonl").read_text().splitlines()
    (work / "generate.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    table_only = subprocess.run([sys.executable, str(ROOT / "benchmarks/needle_generate.py"), "table", "--harness",
                                 str(work / "harness"), "--generate", str(work / "generate.jsonl")],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert table_only.returncode != 0 and "model.generate lacks 1 of the 4 cells" in table_only.stderr
    broken = run_script(tmp_path / "no-such-model", tmp_path / "broken")
    assert broken.returncode != 0 and not (tmp_path / "broken.md").exists()
