"""SmolLM2-135M full fine-tune steps at long lengths on one device, against the dry run's prediction.

For each length: the run set up with the trainer's own functions (train/loop.py's load_model,
CausalLMLoss, make_optimizer, train_step; bfloat16 autocast, activation checkpointing, the chunked
loss), one warm step, then --steps timed steps on the synthetic passkey rows. Reported: tokens/s,
MFU (the dry run's model FLOPs of a step over the time and --peak-tflops), peak memory (CUDA's
max_memory_allocated; on CPU the peak RSS above the process before the model) against `longctx
train --dry-run`'s per-rank total for the same config. Then the ring's kernels: one attention
forward+backward through `ring_attention` on a group of one, backend "torch" (the CUDA flash /
memory-efficient tile kernels) against "torch-math" (the float32 math kernel).

    python benchmarks/train_gpu.py --device cuda --lengths 16k,32k,64k     # benchmarks/gpu/train.sh
    python benchmarks/train_gpu.py --device cpu --model DIR --lengths 256 --ring-lengths 256   # parts on CPU

Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path


def config_dict(model: str, seq_len: int, precision: str) -> dict:
    return {
        "model": model, "output": "unused", "seed": 0, "mode": "full", "precision": precision,
        "activation_checkpointing": True, "loss_chunk_size": 4096, "data": {"source": "synthetic-passkey"},
        "stages": [{"seq_len": seq_len, "rope": {"method": "ntk"}, "steps": 1, "learning_rate": 1e-5}],
    }


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """The peak since reset(): CUDA's allocated bytes, or on CPU the peak RSS above a baseline."""

    def __init__(self, device):
        import torch

        self.device, self.torch = device, torch
        self.baseline = rss_kib("VmRSS") * 1024 if device.type == "cpu" else 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return rss_kib("VmHWM") * 1024 - self.baseline


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(args, device) -> list[dict]:
    import torch

    from longctx.models import read_json, resolve_model
    from longctx.train.config import parse_config
    from longctx.train.data import collate, packed_rows
    from longctx.train.distributed import Runtime
    from longctx.train.dry_run import Hardware, ModelShape, estimate_run, model_config, step_flops
    from longctx.train.loop import load_model, make_optimizer, set_rope, stage_rope, train_step
    from longctx.train.loss import CausalLMLoss
    from longctx.units import parse_token_count

    runtime = Runtime(device=device)
    memory = PeakMemory(device)
    rows = []
    for length in args.lengths.split(","):
        seq_len = parse_token_count(length)
        config = parse_config(config_dict(args.model, seq_len, args.precision))
        model_dir = resolve_model(config.model)
        model, tokenizer = load_model(model_dir, config, runtime)
        set_rope(model, stage_rope(read_json(model_dir / "config.json"), config.stages[0]))
        module = CausalLMLoss(model, config.loss_chunk_size).to(device)
        optimizer, scheduler = make_optimizer(module, config, config.stages[0], args.steps + 1)
        stream = packed_rows(config.data, tokenizer, seq_len, seed=0)
        batches = [collate([next(stream)]) for _ in range(args.steps + 1)]
        train_step(module, optimizer, scheduler, batches[:1], runtime, 1.0, args.precision)  # warm: AdamW state
        memory.reset()
        sync(device)
        started = time.perf_counter()
        for batch in batches[1:]:
            train_step(module, optimizer, scheduler, [batch], runtime, 1.0, args.precision)
        sync(device)
        seconds = (time.perf_counter() - started) / args.steps
        hardware = Hardware(peak_tflops=args.peak_tflops)
        estimate = estimate_run(config, world_size=1, hardware=hardware)
        shape = ModelShape.from_config(model_config(config.model))
        flops = step_flops(config.stages[0], shape, 1, parameters=estimate.layout.matmul_count,
                           trainable=estimate.layout.trainable_count)
        row = {"kind": "train", "seq_len": seq_len, "device": device.type, "precision": args.precision,
               "step_seconds": round(seconds, 3), "tokens_per_s": round(seq_len / seconds, 1),
               "mfu": round(flops / seconds / (args.peak_tflops * 1e12), 4),
               "peak_bytes": memory.peak(), "predicted_bytes": estimate.stages[0].total}
        row["prediction_error"] = round(row["predicted_bytes"] / row["peak_bytes"] - 1, 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, module, optimizer, scheduler
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ring_kernels(args, device) -> list[dict]:
    import torch
    import torch.distributed as dist

    from longctx.parallel import ring_attention
    from longctx.units import parse_token_count

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    dtype = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    rows = []
    try:
        for length in args.ring_lengths.split(","):
            seq = parse_token_count(length)
            generator = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(1, seq, h, 64, device=device, dtype=dtype, generator=generator).requires_grad_()
                       for h in (9, 3, 3))
            outputs = {}
            for backend in ("torch", "torch-math"):
                for _ in range(2):  # the first is warm-up
                    sync(device)
                    started = time.perf_counter()
                    out = ring_attention(q, k, v, causal=True, backend=backend)
                    out.float().square().sum().backward()
                    sync(device)
                    seconds = time.perf_counter() - started
                outputs[backend] = out.detach().float()
                q.grad = k.grad = v.grad = None
                rows.append({"kind": "ring", "seq_len": seq, "backend": backend, "device": device.type,
                             "dtype": str(dtype).removeprefix("torch."), "fwd_bwd_seconds": round(seconds, 4)})
            difference = (outputs["torch"] - outputs["torch-math"]).abs().max().item()
            for row in rows[-2:]:
                row["max_abs_difference"] = difference
                print(json.dumps(row), flush=True)
            if difference > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                raise SystemExit(f"ring backends disagree at {seq}: max |difference| {difference}")
    finally:
        dist.destroy_process_group()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", default="16k,32k,64k")
    parser.add_argument("--ring-lengths", default="16k,32k,64k")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense TFLOPS of the device (default: H100/H200 bf16)")
    args = parser.parse_args()
    import torch

    import longctx  # noqa: F401  (registers the attention implementations, as the CLI does)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU: pass --device cpu to test the parts")
    rows = train_steps(args, device) + ring_kernels(args, device)
    print(f"\n{'seq_len':>8} {'step s':>8} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'dry run GiB':>11} {'error':>7}")
    for row in rows:
        if row["kind"] == "train":
            print(f"{row['seq_len']:>8} {row['step_seconds']:>8.2f} {row['tokens_per_s']:>10,.0f} {row['mfu']:>7.1%} "
                  f"{row['peak_bytes'] / 2**30:>9.2f} {row['predicted_bytes'] / 2**30:>11.2f} {row['prediction_error']:>+7.1%}")
    print(f"\n{'seq_len':>8} {'backend':>11} {'fwd+bwd s':>10} {'max |diff|':>11}")
    for row in rows:
        if row["kind"] == "ring":
            print(f"{row['seq_len']:>8} {row['backend']:>11} {row['fwd_bwd_seconds']:>10.3f} {row['max_abs_difference']:>11.2e}")


if __name__ == "__main__":
    main()
