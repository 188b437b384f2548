"""The distributed set-up of a training run: torchrun's environment read into a Runtime, the (dp, sp)
device mesh, and FSDP2 sharding. One process never touches torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from longctx.errors import LongctxError
from longctx.parallel.fsdp import shard_decoder_layers
from longctx.train.loss import unwrap_causal_lm


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    sp_rank: int = 0
    sp_size: int = 1
    device: torch.device = torch.device("cpu")
    sp_group: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_world(sequence_parallel: int) -> int:
    """torchrun's world size, after checking it can form groups of sequence_parallel."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and sequence_parallel > 1:
        raise LongctxError(
            f"parallel.sequence_parallel is {sequence_parallel} but this is one process; launch with "
            f"torchrun --nproc-per-node {sequence_parallel} -m longctx train ..."
        )
    if world_size % sequence_parallel:
        raise LongctxError(f"{world_size} processes cannot form groups of sequence_parallel={sequence_parallel}; "
                           "launch a multiple of it")
    return world_size


def setup_runtime(sequence_parallel: int, ulysses: int = 1) -> Runtime:
    """Read torchrun's environment; one process returns a Runtime without touching torch.distributed.
    With sequence parallelism, sets the groups `longctx_ring` runs over: Ulysses groups of `ulysses`
    ranks and the ring across them (longctx.parallel.groups)."""
    world_size = check_world(sequence_parallel)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if world_size == 1:
        return Runtime(device=device)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (world_size // sequence_parallel, sequence_parallel), mesh_dim_names=("dp", "sp"))
    sp_group = mesh["sp"].get_group()
    if sequence_parallel > 1:
        import longctx.parallel

        longctx.parallel.set_sequence_parallel_groups(longctx.parallel.new_sequence_parallel_groups(sequence_parallel, ulysses))
    return Runtime(
        rank=rank,
        world_size=world_size,
        dp_rank=mesh["dp"].get_local_rank(),
        dp_size=world_size // sequence_parallel,
        sp_rank=mesh["sp"].get_local_rank(),
        sp_size=sequence_parallel,
        device=device,
        sp_group=sp_group,
    )


def shard_module(module: torch.nn.Module, runtime: Runtime) -> None:
    """FSDP2 over all ranks: each decoder layer is a unit, the root holds embeddings, norm and head."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    shard_decoder_layers(module, unwrap_causal_lm(module.model).model.layers, mesh)
