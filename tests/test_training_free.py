"""benchmarks/gpu/training_free.sh's parts on the CPU: extend per method, needle per model, the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_its_chain_on_a_tiny_model(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny", max_position_embeddings=128)
    env = {**os.environ, "PY": sys.executable, "MODEL": str(model), "LENGTHS": "512", "SAMPLES": "1",
           "DEVICE": "cpu", "OUT": str(tmp_path / "run"), "METHODS": "unscaled,ntk + self-extend",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/training_free.sh")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "run.md").read_text().splitlines()
    assert table[0] == "| method | passkey @ 512 |"
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == {"unscaled", "ntk + self-extend"}
    assert all("(5)" in line for line in rows.values())  # 5 depths x 1 sample each
    assert '"group_size"' in (tmp_path / "run" / "models" / "ntk-self-extend-512" / "config.json").read_text()
