"""torchrun with 2 gloo ranks on CPU: sequence-parallel stages (zigzag ring attention + FSDP2)
give the 1-rank loss curve and weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from longctx.train.api import train_from_config
from longctx.train.checkpoint import read_metrics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(f"Line {i}: " + "pack my box with five dozen liquor jugs. " * (i % 5 + 1) for i in range(60)))
    return path


def config_file(directory, model, corpus, sequence_parallel):
    config = {
        "model": str(model),
        "output": str(directory / "out"),
        "seed": 2,
        "loss_chunk_size": 96,
        "parallel": {"sequence_parallel": sequence_parallel},
        "data": {"source": "files", "paths": [str(corpus)]},
        "stages": [
            {"seq_len": 128, "steps": 3, "learning_rate": 3e-3, "batch_size": 2},
            {"seq_len": 256, "rope": {"method": "yarn"}, "steps": 2, "learning_rate": 2e-3, "gradient_accumulation": 2},
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun_train(config):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*TORCHRUN, "-m", "longctx", "train", "--config", str(config), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_losses(directory):
    return [m["loss"] for m in read_metrics(directory / "out-checkpoints" / "metrics.jsonl") if "loss" in m]


def test_two_rank_sequence_parallel_matches_one_rank(tmp_path, tiny_llama, corpus):
    from safetensors.torch import load_file

    train_from_config(config_file(tmp_path / "one", tiny_llama, corpus, 1), progress=False)
    result = torchrun_train(config_file(tmp_path / "ring", tiny_llama, corpus, 2))
    assert result.stdout.count("trained model:") == 1  # the summary comes from rank 0 only
    one, ring = step_losses(tmp_path / "one"), step_losses(tmp_path / "ring")
    assert len(one) == len(ring) == 5
    torch.testing.assert_close(torch.tensor(ring), torch.tensor(one), rtol=1e-5, atol=1e-5)
    a, b = load_file(tmp_path / "one" / "out" / "model.safetensors"), load_file(tmp_path / "ring" / "out" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    metadata = json.loads((tmp_path / "ring" / "out" / "longctx.json").read_text())
    assert metadata["sequence_parallel"] == 2 and metadata["rope_parameters"]["rope_type"] == "yarn"
