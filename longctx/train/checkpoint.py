"""Checkpoints: resumable training state, and model directories at the end of each stage.

The checkpoint directory (default `<output>-checkpoints`) holds

    metrics.jsonl                one JSON line per logged step and per finished stage
    state-<global step>/         resumable: weights, optimizer, scheduler, data position, RNG
        .metadata                torch.distributed.checkpoint's index: every tensor's global shape and its pieces
        __<rank>_0.distcp        the model's and the optimizer's tensors as rank <rank> held them (its FSDP shards)
        optimizer.json           the optimizer's param_groups and the scheduler's state (plain values)
        rng-<rank>.json          torch / python / numpy (/ cuda) RNG states of rank <rank>
        trainer_state.json       TrainState (stage, step, data position, tokens, schedule) and the run's seed, world size, stage plan
    latest.json                  which state-* directory is the newest complete one
    stage-<i>-<seq_len>/         a model directory (save_pretrained layout) at the end of stage i

A state is saved with torch.distributed.checkpoint (DCP), as torchtitan saves one: every rank
writes only the shards it holds (`get_state_dict`, sharded), and loading reads into the shards
the loading ranks hold, whatever the world size that saved them (DCP reshards). Only tensors go
through DCP; everything else is JSON, so that loading a state unpickles nothing but DCP's index,
and that through an unpickler that builds only the classes such an index holds (read_dcp_index).
Every rank writes into one temporary directory beside the destination; after a barrier rank 0
renames it into place (atomic_output_dir) and names it in latest.json, so a kill during a save
leaves the previous state in force.

On another world size, the model and optimizer are resharded by DCP; the data position is
global (rows of the stage's stream consumed, and where the next row starts), so it carries over
as it is; the RNG states are per rank and do not: each rank seeds its generators from (seed,
global step, rank) instead (`derived_rng`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from longctx.errors import LongctxError
from longctx.models import atomic_output_dir, copy_auxiliary_files, read_json, write_json
from longctx.models.output import TEMPORARY_NAME, remove_stale_temporaries, set_model_max_length

LATEST = "latest.json"
METRICS = "metrics.jsonl"
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's metadata file: a state directory is one of DCP's


# --- RNG -------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states as plain JSON values (no pickle in checkpoints)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def derived_rng(seed: int, global_step: int, rank: int) -> None:
    """Seed torch (and CUDA), python and numpy from (seed, global step, rank): a rank's RNG on a
    resume at another world size, where the saved per-rank states do not map onto the new ranks."""
    value = random.Random(f"{seed}:{global_step}:{rank}").getrandbits(63)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


# --- resumable state -------------------------------------------------------------------------------


def _collective(world_size: int):
    import torch.distributed as dist

    return dist if world_size > 1 else None


# What DCP's index of a tensors-only state is built from; anything else in it is refused unbuilt.
_DCP_INDEX_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _DcpIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_INDEX_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_dcp_index(state_dir: Path):
    """DCP's index (.metadata, a pickle) of a training state, unpickled with only the classes a
    tensors-only index holds: a state from elsewhere cannot run code on resume. (A bytes entry,
    which DCP would load with torch.load(weights_only=False), is refused with the rest.)"""
    path = Path(state_dir) / DCP_INDEX
    try:
        with open(path, "rb") as handle:
            return _DcpIndexUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        raise LongctxError(f"{path} refers to {error}, which the index of a training state never holds; "
                           "it was not unpickled: resume only from states written by longctx train") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise LongctxError(f"{path} is not a readable checkpoint index ({type(error).__name__}: {error}); "
                           "resume from an earlier state or start again without --resume") from None


def _checked_reader(path: Path, index):
    """DCP's file reader, handing DCP `index` (what read_dcp_index read) as the state's index."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return CheckedReader(path)


def _dcp(operation: str, tensors: dict, path: Path, world_size: int) -> None:
    """dcp.save or dcp.load of tensors at path; one process runs it without torch.distributed."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns on every single-process call that it is one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if operation == "save":
            dcp.save(tensors, checkpoint_id=path, no_dist=world_size == 1)
        else:
            index = read_dcp_index(path)  # refused here with one line, before DCP wraps errors per rank
            dcp.load(tensors, checkpoint_id=path, storage_reader=_checked_reader(path, index), no_dist=world_size == 1)


def sharded_state(module, optimizer) -> tuple[dict, dict]:
    """The tensors this rank holds ({"model": ..., "optimizer": ...}, sharded DTensors under FSDP2;
    what DCP saves and loads into) and the optimizer's param_groups (plain values).

    A fresh optimizer has no state yet: get_state_dict gives it one (a step at learning rate 0),
    so a load has tensors to read into.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    tensors = {"model": model_state, "optimizer": optimizer_state["state"]}
    for name, values in optimizer_state["state"].items():
        kinds = {key: type(value).__name__ for key, value in values.items() if not isinstance(value, torch.Tensor)}
        if kinds:  # DCP would pickle them, and a load would unpickle them with weights_only=False
            raise TypeError(f"optimizer state of {name} holds values that are not tensors: {kinds}")
    return tensors, optimizer_state["param_groups"]


@contextlib.contextmanager
def published_by_rank0(dest: Path, rank: int, world_size: int):
    """Yield one temporary directory beside dest to every rank; when each rank has left the block
    (a barrier), rank 0 renames it to dest. Collective: every rank enters it."""
    dist = _collective(world_size)
    if rank == 0:
        with atomic_output_dir(dest, overwrite=True) as tmp:
            if dist:
                dist.broadcast_object_list([str(tmp)], src=0)
            yield tmp
            if dist:
                dist.barrier()  # every rank's files are in tmp: only now may it become dest
    else:
        shared = [None]
        dist.broadcast_object_list(shared, src=0)
        yield Path(shared[0])
        dist.barrier()


def save_training_state(checkpoint_dir: Path, *, module, optimizer, scheduler, trainer_state: dict, rank: int,
                        world_size: int, keep: int = 1) -> Path:
    """Write state-<global step>/ (collective: every rank calls it and writes its own shards)."""
    dest = checkpoint_dir / f"state-{trainer_state['global_step']:08d}"
    tensors, param_groups = sharded_state(module, optimizer)
    with published_by_rank0(dest, rank, world_size) as tmp:
        _dcp("save", tensors, tmp, world_size)
        write_json(tmp / f"rng-{rank}.json", rng_state())
        if rank == 0:
            write_json(tmp / "optimizer.json", {"param_groups": param_groups, "scheduler": scheduler.state_dict()})
            write_json(tmp / "trainer_state.json", trainer_state)
    if rank == 0:
        write_json(checkpoint_dir / LATEST, {"state": dest.name})
        _prune(checkpoint_dir, keep)
    dist = _collective(world_size)
    if dist:
        dist.barrier()  # nobody goes on (to the next save, to the end) before the state is published
    return dest


def _prune(checkpoint_dir: Path, keep: int) -> None:
    states = sorted(checkpoint_dir.glob("state-*"))
    for old in states[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_states(checkpoint_dir: Path) -> None:
    """Remove the temporary state directories that killed runs left (their writer is gone)."""
    names = {match["name"] for path in checkpoint_dir.glob(".state-*")
             if (match := TEMPORARY_NAME.match(path.name))}
    for name in sorted(names):
        remove_stale_temporaries(checkpoint_dir / name)


def latest_state_dir(checkpoint_dir: Path) -> Path | None:
    marker = checkpoint_dir / LATEST
    if not marker.is_file():
        return None
    path = checkpoint_dir / read_json(marker)["state"]
    if not (path / "trainer_state.json").is_file():
        raise LongctxError(f"{marker} names {path.name}, which is incomplete; delete {marker} to resume from scratch")
    if not (path / DCP_INDEX).is_file():
        raise LongctxError(f"{path} is a state saved whole by an older longctx (no sharded checkpoint in it); "
                           f"resume it with that version, or pass --overwrite to start over")
    return path


@dataclasses.dataclass
class TrainState:
    """Where a run stands: the loop advances it, every checkpoint saves it (trainer_state.json), and
    --resume starts from the saved one."""

    stage: int = 0  # index of the stage being trained
    step: int = 0  # optimizer steps done in that stage
    global_step: int = 0  # optimizer steps done in the run
    tokens: int = 0  # tokens trained on in that stage
    data_position: int = 0  # rows of the stage's data stream consumed
    data_resume: dict | None = None  # where the next row starts in a seekable source (train/data.py)
    stage_done: bool = False  # the stage finished and its model directory was written
    schedule: list[dict] = dataclasses.field(default_factory=list)  # one summary per finished stage

    def start_stage(self, index: int) -> None:
        self.stage, self.step, self.tokens, self.data_position, self.data_resume = index, 0, 0, 0, None
        self.stage_done = False

    def to_json(self, **run) -> dict:
        """The state, with fields of the run it belongs to (seed, world size, stage plan) beside it."""
        return {**dataclasses.asdict(self), **run}

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})


def read_trainer_state(state_dir: Path) -> dict:
    """trainer_state.json as saved: TrainState's fields and the run's (TrainState.from_json reads the former)."""
    return read_json(state_dir / "trainer_state.json")


def load_training_state(state_dir: Path, *, module, optimizer, scheduler, rank: int, world_size: int) -> None:
    """Restore weights, optimizer, scheduler and this rank's RNG from state_dir (collective: every
    rank reads the pieces of the tensors it holds, whatever the world size that saved them)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    tensors, _ = sharded_state(module, optimizer)
    _dcp("load", tensors, state_dir, world_size)
    saved = read_json(state_dir / "optimizer.json")
    set_state_dict(module, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": saved["param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    run = read_trainer_state(state_dir)
    if run.get("world_size") == world_size:
        set_rng_state(read_json(state_dir / f"rng-{rank}.json"))
    else:
        derived_rng(run["seed"], run["global_step"], rank)


def load_model_weights(state_dir: Path, module, world_size: int) -> None:
    """Only the weights of a training state (used to continue after a finished stage)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    tensors = {"model": get_model_state_dict(module)}
    _dcp("load", tensors, state_dir, world_size)
    set_model_state_dict(module, tensors["model"])


# --- model directories -------------------------------------------------------------------------


def hf_export_plan(module_state: dict, *, tied: bool) -> dict[str, tuple[str, str | None, str | None]]:
    """Each tensor of the exported model under transformers' names -> (its module name, and the
    LoRA A and B module names merged into it, or None).

    Module names are `model.<causal lm names>` (CausalLMLoss), or with PEFT
    `model.base_model.model.<names>` where a LoRA-wrapped linear holds `base_layer.weight`,
    `lora_A.default.weight` and `lora_B.default.weight`: merged as W + scaling * B @ A. A tied
    lm_head is left out (transformers ties it on load).
    """
    plan = {}
    for name in module_state:
        short = name.removeprefix("model.").removeprefix("base_model.model.")
        if ".lora_A." in short or ".lora_B." in short or ".lora_dropout" in short:
            continue
        lora_a = lora_b = None
        if ".base_layer." in short:
            prefix, _, leaf = short.partition(".base_layer.")
            owner = name[: len(name) - len(short)] + prefix
            if leaf == "weight" and f"{owner}.lora_A.default.weight" in module_state:
                lora_a, lora_b = f"{owner}.lora_A.default.weight", f"{owner}.lora_B.default.weight"
            short = f"{prefix}.{leaf}"
        if not (tied and short == "lm_head.weight"):
            plan[short] = (name, lora_a, lora_b)
    return plan


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor: a DTensor shard is gathered (collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def hf_tensors(module_state: dict, plan: dict, *, lora_scaling: float | None, dtype: torch.dtype):
    """Yield (name, tensor) of the exported model one at a time, each gathered from its shards just
    before it is yielded (collective under FSDP: every rank iterates it in the same order)."""
    for name, (source, lora_a, lora_b) in plan.items():
        tensor = _whole(module_state[source])
        if lora_a is not None:
            delta = (_whole(module_state[lora_b]).float() @ _whole(module_state[lora_a]).float()) * float(lora_scaling)
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield name, tensor.to(dtype)


def export_model_dir(dest: Path, module, *, config, source_dir: Path, metadata: dict, dtype: torch.dtype,
                     lora_scaling: float | None, rank: int, world_size: int) -> None:
    """A save_pretrained-style model directory (sharded safetensors, config, tokenizer, longctx.json)
    of the trained module, streamed: one parameter at a time is gathered, written by rank 0 through
    SafetensorsWriter, and dropped. Collective: every rank calls it."""
    from longctx.models.metadata import write_metadata
    from longctx.models.writer import SafetensorsWriter

    module_state = module.state_dict()  # under FSDP2 the shards this rank holds (DTensors)
    plan = hf_export_plan(module_state, tied=bool(getattr(config, "tie_word_embeddings", False)))
    tensors = hf_tensors(module_state, plan, lora_scaling=lora_scaling, dtype=dtype)
    if rank == 0:
        layout = {name: (tuple(module_state[source].shape), dtype) for name, (source, _, _) in plan.items()}
        with atomic_output_dir(dest, overwrite=True) as tmp:
            with SafetensorsWriter(tmp, layout) as writer:
                for name, tensor in tensors:
                    writer.write(name, tensor)
            config.save_pretrained(tmp)
            copy_auxiliary_files(source_dir, tmp)
            if config.max_position_embeddings != read_json(Path(source_dir) / "config.json").get("max_position_embeddings"):
                set_model_max_length(tmp, config.max_position_embeddings)
            write_metadata(tmp, **metadata)
    else:
        for _ in tensors:  # take part in each gather
            pass
    dist = _collective(world_size)
    if dist:
        dist.barrier()


# --- metrics log ---------------------------------------------------------------------------------


def append_metrics(checkpoint_dir: Path, record: dict) -> None:
    with open(checkpoint_dir / METRICS, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(checkpoint_dir: Path, global_step: int) -> None:
    """Drop log lines written after the state being resumed from (the killed run's tail)."""
    path = checkpoint_dir / METRICS
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("global_step", 0) <= global_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
