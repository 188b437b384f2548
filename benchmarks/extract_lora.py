"""Benchmark: `longctx extract-lora` against `mergekit-extract-lora` on the same pair and rank.

For each pair, both tools run in their own subprocess under GNU time (wall, peak RSS; CPU
time from the children's rusage); each adapter's reconstruction error ||dW - BA|| / ||dW||
is then measured by the same code (longctx.lora.measure.measure_adapter) over every LoRA
module. longctx's run is broken down into start-up (imports; the floor is measured:
`python -c "import torch"`), set-up and the tensor pass with its phases, from the
timings in its extraction_report.json.

Pairs (generated under --workdir, never in the repo):
  smollm2  SmolLM2-135M-Instruct (float32) and a SYNTHETIC "extended" model: the base
           weights plus a rank-16 delta with decaying singular values and small dense
           noise on every attention/MLP projection, a changed final norm, and yarn x4
           rope settings in its config. Not a real fine-tune.
  llama1b  a Llama-3.2-1B-shaped pair (hidden 2048, 32 heads / 8 kv heads, intermediate
           8192, vocab 128256, tied embeddings) with random bf16 weights written tensor by
           tensor; --llama-layers of its 16 layers (default 16).

Run (heavy: hold the shared lock). One command per pair, or step by step (each step saves
its figures in <workdir>/<pair>-r<rank>.json; `report` prints the tables). `--step kernels`
(no pair) times, on one thread, the two kernels of longctx.lora.lowrank chosen for speed
against what they replace:
  flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/extract_lora.py --step kernels
  flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/extract_lora.py --pair smollm2 --rank 32 --repeat 3
  for step in generate longctx mergekit measure report; do
    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/extract_lora.py --pair llama1b --rank 32 --step $step
  done
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from common import LLAMA_32_1B, partial_dir, run_measured, write_random_llama

from longctx.lora.measure import measure_adapter
from longctx.models import (
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
    with TensorReader(base_dir) as base:
        tmp, writer = partial_dir(out_dir, {name: (base.shape(name), base.dtype(name)) for name in base.names()})
        with writer:
            for name in base.names():
                tensor = base.get(name)
                if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                    tensor = (tensor.float() + structured_delta(tensor, generator)).to(tensor.dtype)
                elif name == "model.norm.weight":
                    tensor = (tensor.float() * 1.01).to(tensor.dtype)
                writer.write(name, tensor)
    config = read_json(base_dir / "config.json")
    original = config["max_position_embeddings"]
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0, "original_max_position_embeddings": original}
    write_json(tmp / "config.json", apply_rope_settings(config, rope, 4 * original))
    copy_auxiliary_files(base_dir, tmp)
    tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------
# Steps. Each writes its figures into <workdir>/<pair>-r<rank>.json, so a run can be split
# into commands that each fit a slot of the shared lock (generate / longctx / mergekit /
# measure / report) and resumed.


def pair_paths(pair: str, workdir: Path, layers: int) -> tuple[str, Path, Path, str]:
    """(label, base dir, extended dir, factor dtype) of a pair, generating it if needed."""
    if pair == "smollm2":
        base = with_architectures(resolve_model("smollm2-135m"), workdir / "smollm2-base")
        extended = make_extended(base, workdir / "smollm2-extended-synthetic-v2")
        return "SmolLM2-135M (synthetic delta), fp32", base, extended, "float32"
    base = write_random_llama(workdir / f"llama1b-shaped-{layers}l-base", {**LLAMA_32_1B, "num_hidden_layers": layers})
    extended = make_extended(base, workdir / f"llama1b-shaped-{layers}l-extended")
    return f"Llama-3.2-1B-shaped bf16, {layers} of 16 layers", base, extended, "bfloat16"


def measured_run(command: list[str], log_path: Path) -> dict:
    """Wall seconds, CPU seconds (user + system, the command and its children) and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak = run_measured(command, log_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": seconds, "cpu_s": cpu, "peak_rss_mb": peak / 1024**2}


def tool_command(tool: str, base: Path, extended: Path, out_dir: Path, rank: int, dtype: str) -> list[str]:
    if tool == "longctx":
        return [str(VENV_BIN / "longctx"), "extract-lora", str(base), str(extended), "--output", str(out_dir),
                "--rank", str(rank), "--dtype", dtype, "--no-progress"]
    return [str(VENV_BIN / "mergekit-extract-lora"), "--model", str(extended), "--base-model", str(base),
            "--out-path", str(out_dir), "--max-rank", str(rank), "--no-cuda", "--quiet"]


def run_tool(tool: str, base: Path, extended: Path, rank: int, dtype: str, workdir: Path, key: str, repeat: int) -> dict:
    """`repeat` runs of one tool; the figures of each run, and the median run's."""
    out_dir = workdir / f"{key}-{tool}-r{rank}"
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        runs.append(measured_run(tool_command(tool, base, extended, out_dir, rank, dtype), workdir / f"{key}-{tool}.log"))
    median = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]
    result = {**median, "runs": runs, "adapter": str(out_dir), "command": " ".join(tool_command(tool, base, extended, out_dir, rank, dtype))}
    if tool == "longctx":
        result["timings"] = read_json(out_dir / "extraction_report.json")["summary"]["timings"]
    return result


def import_floor(repeat: int = 3) -> dict:
    """Wall seconds of `python -c 'import torch'` and of importing the extract-lora code (median of `repeat`),
    each ending as the longctx console script does (gc.freeze(): no final walk over torch's objects)."""
    floor = {}
    for label, code in (("python_import_torch_s", "import gc, torch; gc.freeze()"),
                        ("python_import_extract_s", "import gc, longctx.cli, longctx.lora.extract; gc.freeze()")):
        times = sorted(run_measured([sys.executable, "-c", code])[0] for _ in range(repeat))
        floor[label] = times[len(times) // 2]
    return floor


def adapter_error(base: Path, extended: Path, adapter: Path) -> dict:
    modules = [m for m in measure_adapter(base, extended, adapter) if m.get("relative_error") is not None]
    errors = [m["relative_error"] for m in modules]
    return {"modules": len(modules), "mean_error": sum(errors) / len(errors), "max_error": max(errors),
            "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size / 1e6}


def print_tables(result: dict) -> None:
    ours, theirs = result["longctx"], result["mergekit"]
    print(f"\n## {result['label']}, rank {result['rank']} ({ours.get('modules', '?')} LoRA modules)")
    print("| tool | wall s | CPU s | peak RSS MB | mean rel. error | max rel. error | adapter MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row in (("longctx extract-lora", ours), ("mergekit-extract-lora", theirs)):
        print(f"| {label} | {row['wall_s']:.2f} | {row['cpu_s']:.1f} | {row['peak_rss_mb']:.0f} | {row.get('mean_error', float('nan')):.5f} "
              f"| {row.get('max_error', float('nan')):.5f} | {row.get('adapter_mb', float('nan')):.1f} |")
    ratio = lambda key: theirs[key] / ours[key]  # noqa: E731
    errors = (f"{ours['mean_error'] / theirs['mean_error']:.4f} | {ours['max_error'] / theirs['max_error']:.4f}"
              if "mean_error" in ours and "mean_error" in theirs else " | ")
    print(f"| **mergekit / longctx** | **{ratio('wall_s'):.2f}x** | **{ratio('cpu_s'):.2f}x** | **{ratio('peak_rss_mb'):.2f}x** "
          f"| longctx / mergekit: {errors} | |")
    for tool, row in (("longctx", ours), ("mergekit", theirs)):
        walls = ", ".join(f"{run['wall_s']:.2f}" for run in row["runs"])
        print(f"{tool} wall times of {len(row['runs'])} run(s): {walls} s (median shown)")
    timings, floor = ours.get("timings"), result.get("floor")
    if timings and floor:
        inside = timings["setup_seconds"] + timings["tensor_pass_seconds"]
        phases = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in timings["phase_seconds"].items())
        print(f"\nwhere longctx's {ours['wall_s']:.2f} s go: process start-up and imports {ours['wall_s'] - inside:.2f} s "
              f"(floor: `python -c 'import torch'` {floor['python_import_torch_s']:.2f} s, torch + longctx "
              f"{floor['python_import_extract_s']:.2f} s), set-up (layout, checks) {timings['setup_seconds']:.2f} s, "
              f"tensor pass {timings['tensor_pass_seconds']:.2f} s on {timings['workers']} workers "
              f"(thread-seconds: {phases}; read {timings['bytes_read'] / 1e6:.0f} MB at {timings['read_mb_per_second']:.0f} MB/s)")


def best_seconds(function, repeat: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def print_kernel_figures(repeat: int = 7) -> None:
    """svd_wide against torch.linalg.svd on a sketch's k x n matrix (k = rank 32 + oversampling 16),
    and frobenius_sq against a float64 norm (with a plain float32 norm's relative error), on
    SmolLM2's and Llama-3.2-1B's matrix shapes; one thread, best of `repeat`."""
    from longctx.lora.lowrank import frobenius_sq, svd_wide

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("| k x n | torch.linalg.svd ms | svd_wide ms | svd / svd_wide |")
    print("|---|---:|---:|---:|")
    for n in (576, 1536, 2048, 8192):
        sketch = torch.randn(48, n, generator=generator)
        lapack = best_seconds(lambda: torch.linalg.svd(sketch, full_matrices=False), repeat)
        ours = best_seconds(lambda: svd_wide(sketch), repeat)
        print(f"| 48 x {n} | {lapack * 1e3:.2f} | {ours * 1e3:.2f} | {lapack / ours:.2f}x |")
    print("\n| matrix | float64 norm ms | frobenius_sq ms | float64 / frobenius_sq | float32 norm rel. error | frobenius_sq rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows, cols in ((1536, 576), (8192, 2048), (128256, 2048)):
        matrix = torch.randn(rows, cols, generator=generator) * 0.02 + 0.001
        exact = float(torch.linalg.vector_norm(matrix.double()) ** 2)
        float64 = best_seconds(lambda: float(torch.linalg.vector_norm(matrix.double()) ** 2), max(2, repeat // 3))
        ours = best_seconds(lambda: frobenius_sq(matrix), max(2, repeat // 3))
        plain = float(torch.linalg.vector_norm(matrix)) ** 2
        print(f"| {rows} x {cols} | {float64 * 1e3:.1f} | {ours * 1e3:.1f} | {float64 / ours:.1f}x "
              f"| {abs(plain - exact) / exact:.1e} | {abs(frobenius_sq(matrix) - exact) / exact:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("smollm2", "llama1b"), help="the model pair (every step but kernels)")
    parser.add_argument("--step", choices=("all", "generate", "longctx", "mergekit", "measure", "report", "kernels"),
                        default="all")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--llama-layers", type=int, default=16,
                        help="layers of the Llama-3.2-1B-shaped pair (16 = the real depth)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool; the median wall time is reported")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/longctx-bench-extract"))
    args = parser.parse_args()
    if args.step == "kernels":
        print_kernel_figures()
        return
    if args.pair is None:
        parser.error("--pair is required (except with --step kernels)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    label, base, extended, dtype = pair_paths(args.pair, args.workdir, args.llama_layers)
    key = args.pair if args.pair == "smollm2" else f"llama1b-{args.llama_layers}l"
    results_path = args.workdir / f"{key}-r{args.rank}.json"
    result = json.loads(results_path.read_text()) if results_path.is_file() else {}
    result.update(pair=args.pair, label=label, rank=args.rank)
    steps = ("longctx", "mergekit", "measure", "report") if args.step == "all" else (args.step,)
    for step in steps:
        if step in ("longctx", "mergekit"):
            result[step] = run_tool(step, base, extended, args.rank, dtype, args.workdir, key, args.repeat)
            if step == "longctx":
                result["floor"] = import_floor()
            print(f"{step}: {result[step]['wall_s']:.2f} s wall, {result[step]['cpu_s']:.1f} s CPU, "
                  f"{result[step]['peak_rss_mb']:.0f} MB peak RSS", flush=True)
        elif step == "measure":  # the adapters not measured yet
            for tool in ("longctx", "mergekit"):
                if tool in result and "mean_error" not in result[tool]:
                    result[tool].update(adapter_error(base, extended, Path(result[tool]["adapter"])))
        elif step == "report":
            print_tables(result)
        results_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
