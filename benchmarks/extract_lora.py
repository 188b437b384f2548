"""Benchmark: `longctx extract-lora` against `mergekit-extract-lora` on the same pair and rank.

For each pair, both tools run in their own subprocess under /usr/bin/time -v (peak RSS);
each adapter's reconstruction error ||dW - BA|| / ||dW|| is then measured by the same
code (longctx.lora.extract.measure_adapter) over every LoRA module.

Pairs (generated under --workdir, never in the repo):
  smollm2  SmolLM2-135M-Instruct (float32) and a SYNTHETIC "extended" model: the base
           weights plus a rank-16 delta with decaying singular values and small dense
           noise on every attention/MLP projection, a changed final norm, and yarn x4
           rope settings in its config. Not a real fine-tune.
  llama1b  a Llama-3.2-1B-shaped pair (hidden 2048, 32 heads / 8 kv heads, intermediate
           8192, vocab 128256, tied embeddings) with random bf16 weights written tensor by
           tensor; --llama-layers of its 16 layers (default 16).

Run (heavy: hold the shared lock):
  flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/extract_lora.py --pair smollm2 --rank 32
  flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/extract_lora.py --pair llama1b --rank 32 --llama-layers 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from common import run_measured

from longctx.lora.extract import measure_adapter
from longctx.models import (
    ShardedSafetensorsWriter,
    TensorReader,
    copy_auxiliary_files,
    link_or_copy,
    read_json,
    resolve_model,
    write_json,
)
from longctx.rope.config import apply_rope_settings

VENV_BIN = Path(sys.executable).parent
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DELTA_RANK = 16


def structured_delta(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A rank-16 delta with singular values decaying 2x every 4, about 2% of ||W||, plus noise
    carrying about 1% of the delta's energy (a fine-tune's delta is not exactly low-rank)."""
    rows, cols = weight.shape
    u = torch.linalg.qr(torch.randn(rows, DELTA_RANK, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(cols, DELTA_RANK, generator=generator)).Q
    spectrum = 2.0 ** (-torch.arange(DELTA_RANK) / 4)
    delta = (u * spectrum) @ v.T
    delta *= 0.02 * torch.linalg.norm(weight.float()) / torch.linalg.norm(delta)
    noise = torch.randn(rows, cols, generator=generator)
    delta += noise * (0.1 * torch.linalg.norm(delta) / torch.linalg.norm(noise))
    return delta


def _partial_dir(out_dir: Path) -> tuple[Path, ShardedSafetensorsWriter]:
    """A fresh <out_dir>.partial and a shard writer into it (renamed to out_dir when complete)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, ShardedSafetensorsWriter(tmp, max_shard_bytes=1 << 30)


def with_architectures(model_dir: Path, link_dir: Path) -> Path:
    """mergekit needs config.architectures, which a GGUF-converted config lacks: give it a
    hard-linked copy of the model whose config names the architecture (the weights are the same files)."""
    config = read_json(model_dir / "config.json")
    if config.get("architectures"):
        return model_dir
    if not (link_dir / "config.json").is_file():
        link_dir.mkdir(parents=True, exist_ok=True)
        for file in model_dir.iterdir():
            if file.is_file() and file.name != "config.json":
                link_or_copy(file, link_dir / file.name)
        write_json(link_dir / "config.json", {**config, "architectures": ["LlamaForCausalLM"]})
    return link_dir


def make_extended(base_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """EXTENDED = BASE + structured deltas on the projections, streamed tensor by tensor."""
    if (out_dir / "config.json").is_file():
        return out_dir
    generator = torch.Generator().manual_seed(seed)
    tmp, writer = _partial_dir(out_dir)
    with TensorReader(base_dir) as base:
        for name, tensor in base.iter_tensors():
            if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                tensor = (tensor.float() + structured_delta(tensor, generator)).to(tensor.dtype)
            elif name == "model.norm.weight":
                tensor = (tensor.float() * 1.01).to(tensor.dtype)
            writer.add(name, tensor)
    writer.close()
    config = read_json(base_dir / "config.json")
    original = config["max_position_embeddings"]
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0, "original_max_position_embeddings": original}
    write_json(tmp / "config.json", apply_rope_settings(config, rope, 4 * original))
    copy_auxiliary_files(base_dir, tmp)
    tmp.rename(out_dir)
    return out_dir


LLAMA_1B = dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256, layers=16)


def make_llama1b_base(out_dir: Path, layers: int, *, seed: int = 0) -> Path:
    """Random bf16 weights of Llama-3.2-1B's shapes, generated and written one tensor at a time."""
    if (out_dir / "config.json").is_file():
        return out_dir
    shape = LLAMA_1B
    generator = torch.Generator().manual_seed(seed)
    tmp, writer = _partial_dir(out_dir)
    hidden, kv = shape["hidden"], shape["kv_heads"] * shape["head_dim"]

    def add(name, rows, cols=None):
        size = (rows, cols) if cols else (rows,)
        tensor = torch.ones(size) if cols is None else torch.randn(size, generator=generator) * 0.02
        writer.add(name, tensor.to(torch.bfloat16))

    add("model.embed_tokens.weight", shape["vocab"], hidden)
    for i in range(layers):
        prefix = f"model.layers.{i}"
        add(f"{prefix}.self_attn.q_proj.weight", hidden, hidden)
        add(f"{prefix}.self_attn.k_proj.weight", kv, hidden)
        add(f"{prefix}.self_attn.v_proj.weight", kv, hidden)
        add(f"{prefix}.self_attn.o_proj.weight", hidden, hidden)
        add(f"{prefix}.mlp.gate_proj.weight", shape["intermediate"], hidden)
        add(f"{prefix}.mlp.up_proj.weight", shape["intermediate"], hidden)
        add(f"{prefix}.mlp.down_proj.weight", hidden, shape["intermediate"])
        add(f"{prefix}.input_layernorm.weight", hidden)
        add(f"{prefix}.post_attention_layernorm.weight", hidden)
    add("model.norm.weight", hidden)
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": shape["intermediate"], "num_hidden_layers": layers, "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "head_dim": shape["head_dim"], "vocab_size": shape["vocab"],
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128009, "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    write_json(tmp / "config.json", config)
    tmp.rename(out_dir)
    return out_dir


def _timed(command: list[str], log_path: Path) -> dict:
    seconds, peak = run_measured(command, log_path)
    return {"seconds": seconds, "peak_rss_mb": peak / 1024**2}


def adapter_error(base: Path, extended: Path, adapter: Path) -> dict:
    modules = [m for m in measure_adapter(base, extended, adapter) if m.get("relative_error") is not None]
    errors = [m["relative_error"] for m in modules]
    return {"modules": len(modules), "mean_error": sum(errors) / len(errors), "max_error": max(errors),
            "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size / 1e6}


def bench_pair(name: str, base: Path, extended: Path, rank: int, dtype: str, workdir: Path) -> dict:
    ours_dir, theirs_dir = workdir / f"{name}-longctx-r{rank}", workdir / f"{name}-mergekit-r{rank}"
    for directory in (ours_dir, theirs_dir):
        shutil.rmtree(directory, ignore_errors=True)
    ours = _timed([str(VENV_BIN / "longctx"), "extract-lora", str(base), str(extended), "--output", str(ours_dir),
                      "--rank", str(rank), "--dtype", dtype, "--no-progress"], workdir / f"{name}-longctx.log")
    theirs = _timed([str(VENV_BIN / "mergekit-extract-lora"), "--model", str(extended), "--base-model", str(base),
                        "--out-path", str(theirs_dir), "--max-rank", str(rank), "--no-cuda", "--quiet"], workdir / f"{name}-mergekit.log")
    ours.update(adapter_error(base, extended, ours_dir))
    theirs.update(adapter_error(base, extended, theirs_dir))
    return {"pair": name, "rank": rank, "longctx": ours, "mergekit": theirs}


def print_table(result: dict) -> None:
    ours, theirs = result["longctx"], result["mergekit"]
    print(f"\n## {result['pair']}, rank {result['rank']} ({ours['modules']} LoRA modules)")
    print("| tool | wall s | peak RSS MB | mean rel. error | max rel. error | adapter MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in (("longctx extract-lora", ours), ("mergekit-extract-lora", theirs)):
        print(f"| {label} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['mean_error']:.5f} | {row['max_error']:.5f} | {row['adapter_mb']:.1f} |")
    print(f"| **mergekit / longctx** | **{theirs['seconds'] / ours['seconds']:.2f}x** | **{theirs['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x** "
          f"| {theirs['mean_error'] / ours['mean_error']:.4f} | {theirs['max_error'] / ours['max_error']:.4f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("smollm2", "llama1b", "both"), default="both")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--llama-layers", type=int, default=16,
                        help="layers of the Llama-3.2-1B-shaped pair (16 = the real depth)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/longctx-bench-extract"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = []
    if args.pair in ("smollm2", "both"):
        base = with_architectures(resolve_model("smollm2-135m"), args.workdir / "smollm2-base")
        extended = make_extended(base, args.workdir / "smollm2-extended-synthetic-v2")
        results.append(bench_pair("smollm2-135m (synthetic delta)", base, extended, args.rank, "float32", args.workdir))
        print_table(results[-1])
    if args.pair in ("llama1b", "both"):
        base = make_llama1b_base(args.workdir / f"llama1b-shaped-{args.llama_layers}l-base", args.llama_layers)
        extended = make_extended(base, args.workdir / f"llama1b-shaped-{args.llama_layers}l-extended")
        label = f"Llama-3.2-1B-shaped bf16, {args.llama_layers} of 16 layers"
        results.append(bench_pair(label, base, extended, args.rank, "bfloat16", args.workdir))
        print_table(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
