"""Measurement helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

GNU_TIME = "/usr/bin/time"


def cpu_seconds(work, repeat: int) -> float:
    """The smallest CPU time of this process over `repeat` calls of work()."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def run_measured(command: list[str], log_path: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one command run in its own process.

    Peak RSS comes from GNU time, which forks the command from its own small process: the
    ru_maxrss that wait4 reports for a direct child of this (large) Python process keeps the
    parent's RSS at fork time across exec, and would inflate small figures. Without GNU time,
    wait4's figure is used. Output goes to log_path when given; a failure raises SystemExit
    with the end of its output.
    """
    measured = [GNU_TIME, "-f", "maxrss_kb=%M", *command] if os.path.exists(GNU_TIME) else command
    started = time.perf_counter()
    process = subprocess.Popen(measured, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.stdout.close()
    if log_path is not None:
        Path(log_path).write_text(output)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:4]} failed (exit {os.waitstatus_to_exitcode(status)}):\n{output[-3000:]}")
    reported = [line for line in output.splitlines() if line.startswith("maxrss_kb=")]
    kilobytes = int(reported[-1].split("=")[1]) if reported else usage.ru_maxrss
    return seconds, kilobytes * 1024


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none when it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Llama-3.2-1B's configuration (its real shapes and rope settings) for random stand-ins.
LLAMA_32_1B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128009,
    dtype="bfloat16",
)


def llama_layout(config: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a Llama checkpoint with tied embeddings, in checkpoint order."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (inner, hidden),
            prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner),
        })
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def partial_dir(out_dir: Path, layout: dict, max_shard_bytes: int = 1 << 30):
    """(a fresh <out_dir>.partial, a writer into it of the tensors in layout, {name: (shape, dtype)} in order);
    close the writer, then rename the directory to out_dir once complete."""
    from longctx.models import SafetensorsWriter

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, SafetensorsWriter(tmp, layout, max_shard_bytes=max_shard_bytes)


def write_random_llama(
    directory: Path, config: dict, *, tokenizer_source: Path | None = None, seed: int = 0, max_shard_bytes: int = 1 << 30
) -> Path:
    """A Llama model with random weights (norms 1, the rest N(0, 0.02)) in config["dtype"], written
    tensor by tensor, never the whole model in memory; tokenizer files copied from tokenizer_source.
    An existing directory is reused."""
    import torch

    from longctx.models import copy_auxiliary_files, write_json

    if (directory / "config.json").is_file():
        return directory
    dtype = getattr(torch, config["dtype"])
    shapes = llama_layout(config)
    tmp, writer = partial_dir(directory, {name: (shape, dtype) for name, shape in shapes.items()}, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    with writer:
        for name, shape in shapes.items():
            tensor = torch.ones(shape) if name.endswith("norm.weight") else torch.empty(shape).normal_(0, 0.02, generator=generator)
            writer.write(name, tensor.to(dtype))
    write_json(tmp / "config.json", config)
    if tokenizer_source is not None:
        copy_auxiliary_files(tokenizer_source, tmp, skip=("generation_config.json",))
    os.replace(tmp, directory)
    return directory
