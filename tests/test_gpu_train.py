"""benchmarks/gpu/train.sh's parts on the CPU with a tiny model: training steps measured against the dry
run's prediction, the ring's two kernels compared; and that a failing part fails the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def run_script(model, log, **extra):
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(model), "DEVICE": "cpu", "LENGTHS": "256,512",
           "RING_LENGTHS": "256", "STEPS": "1", "PEAK_TFLOPS": "0.05", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", **extra}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu/train.sh"), str(log)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_gpu_train_script_runs_its_parts_on_a_tiny_model_and_fails_loudly(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=128)
    result = run_script(model, tmp_path / "train.log")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines() if line.startswith("{")]
    train = [row for row in rows if row["kind"] == "train"]
    assert [row["seq_len"] for row in train] == [256, 512]
    for row in train:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["peak_bytes"] > 0 and row["predicted_bytes"] > 0
    assert train[1]["predicted_bytes"] > train[0]["predicted_bytes"]
    ring = [row for row in rows if row["kind"] == "ring"]
    assert [row["backend"] for row in ring] == ["torch", "torch-math"]
    assert ring[0]["max_abs_difference"] < 2e-2

    broken = run_script(tmp_path / "missing-model", tmp_path / "broken.log")
    assert broken.returncode != 0
