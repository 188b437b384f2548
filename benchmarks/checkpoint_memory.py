"""Peak RSS per rank while saving and loading a training state: sharded (DCP, what `longctx train`
does) against the full gather on rank 0 that it replaced (reconstructed here as the peer).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/checkpoint_memory.py --ranks 2 [--model DIR] [--seq-len 512]

Every rank of a gloo group loads the model (FSDP2 over all ranks, AdamW), takes two training
steps on random tokens (its steady training peak), then saves and loads a state both ways. A
sampler thread reads this process's RSS from /proc/self/statm every 2 ms; each phase's peak is
the highest sample between its start and end. Prints one JSON line per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        with open("/proc/self/statm") as statm:
            while self.running:
                statm.seek(0)
                self.peak = max(self.peak, int(statm.read().split()[1]) * PAGE)
                time.sleep(0.002)

    def phase(self, work):
        """(peak RSS bytes, wall seconds) of work()."""
        time.sleep(0.01)
        with open("/proc/self/statm") as statm:
            self.peak = int(statm.read().split()[1]) * PAGE
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        time.sleep(0.01)
        return self.peak, seconds


def full_gather_save(module, optimizer, scheduler, directory: Path, rank: int):
    """The path longctx replaced: full model and optimizer state gathered to rank 0's CPU, written there."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from longctx.models import write_safetensors

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options)
    if rank == 0:
        write_safetensors(directory, {k: v.contiguous() for k, v in model_state.items()}, max_shard_bytes=None)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, directory / "optimizer.pt")
    dist.barrier()


def full_gather_load(module, optimizer, directory: Path):
    """Every rank reads the whole state and keeps its shards (set_*_state_dict with full_state_dict)."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, load_file(directory / "model.safetensors"), options=options)
    saved = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(module, optimizer, saved["optimizer"], options=options)


def worker(rank, world_size, model_dir, seq_len, root):
    import torch

    from longctx.train import checkpoint as ckpt
    from longctx.train.config import parse_config
    from longctx.train.distributed import setup_runtime, shard_module
    from longctx.train.loop import load_model, make_optimizer, train_step
    from longctx.train.loss import CausalLMLoss

    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(1)
    config = parse_config({"model": str(model_dir), "activation_checkpointing": True, "loss_chunk_size": 256,
                           "data": {"source": "synthetic-passkey"},
                           "stages": [{"seq_len": seq_len, "steps": 10, "learning_rate": 1e-5}]})
    runtime = setup_runtime(1)
    model, _ = load_model(model_dir, config, runtime)
    module = CausalLMLoss(model, config.loss_chunk_size)
    shard_module(module, runtime)
    optimizer, scheduler = make_optimizer(module, config, config.stages[0], 10)
    sampler = RssSampler()
    sampler.start()
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
    batch = {"input_ids": ids, "position_ids": torch.arange(seq_len)[None], "labels": torch.roll(ids, -1, 1)}
    train = sampler.phase(lambda: [train_step(module, optimizer, scheduler, [batch], runtime, 1.0) for _ in range(2)])
    state = {"global_step": 2, "seed": 0}
    sharded_dir, full_dir = Path(root) / "sharded", Path(root) / "full"
    full_dir.mkdir(exist_ok=True)
    figures = {
        "sharded_save": sampler.phase(lambda: ckpt.save_training_state(
            sharded_dir, module=module, optimizer=optimizer, scheduler=scheduler, trainer_state=state,
            rank=rank, world_size=world_size)),
        "sharded_load": sampler.phase(lambda: ckpt.load_training_state(
            sharded_dir / "state-00000002", module=module, optimizer=optimizer, scheduler=scheduler,
            rank=rank, world_size=world_size)),
        "full_save": sampler.phase(lambda: full_gather_save(module, optimizer, scheduler, full_dir, rank)),
        "full_load": sampler.phase(lambda: full_gather_load(module, optimizer, full_dir)),
    }
    sampler.running = False
    row = {"rank": rank, "world_size": world_size, "train_peak_mib": round(train[0] / 2**20)}
    for phase, (peak, seconds) in figures.items():
        row[f"{phase}_ratio"] = round(peak / train[0], 3)
        row[f"{phase}_s"] = round(seconds, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", default=str(Path.home() / ".cache/longctx/models/smollm2-135m-instruct-f32"))
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    import socket
    from datetime import timedelta

    import torch.distributed as dist
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def entry(rank, world_size, root):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=20))
        try:
            worker(rank, world_size, Path(args.model), args.seq_len, root)
        finally:
            dist.destroy_process_group()

    root = tempfile.mkdtemp(prefix="checkpoint-memory-")
    try:
        mp.start_processes(entry, args=(args.ranks, root), nprocs=args.ranks, join=True, start_method="fork")
    finally:
        shutil.rmtree(root, ignore_errors=True)
