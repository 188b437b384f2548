"""Checkpoints: resumable training state, and model directories at the end of each stage.

The checkpoint directory (default `<output>-checkpoints`) holds

    metrics.jsonl                one JSON line per logged step and per finished stage
    state-<global step>/         resumable: weights, optimizer, scheduler, data position, RNG
        model.safetensors        the trained module's full state (names as in the module)
        optimizer.pt             optimizer + scheduler state (loaded with weights_only=True)
        rng.json                 torch / python / numpy (/ cuda) RNG states of every rank
        trainer_state.json       stage, step, data position, tokens seen, schedule so far
    latest.json                  which state-* directory is the newest complete one
    stage-<i>-<seq_len>/         a model directory (save_pretrained layout) at the end of stage i

A state directory is written through atomic_output_dir and named in latest.json only
once complete, so a kill during a save leaves the previous one in force.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from longctx.errors import LongctxError
from longctx.models import atomic_output_dir, copy_auxiliary_files, read_json, write_json, write_safetensors
from longctx.models.output import set_model_max_length

LATEST = "latest.json"
METRICS = "metrics.jsonl"


# --- state dicts across the single-process and FSDP paths --------------------------------


def full_model_state(module: torch.nn.Module, distributed: bool) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) state dict on CPU; every rank must call this under FSDP."""
    if not distributed:
        return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], distributed: bool) -> None:
    if not distributed:
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(module, optimizer, distributed: bool) -> dict:
    if not distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module, optimizer, state: dict, distributed: bool) -> None:
    if not distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _unique_storage(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared tensors (tied embeddings): keep one name per storage, record the aliases."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.contiguous()
    return unique, aliases


# --- resumable state -------------------------------------------------------------------------


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


def save_training_state(
    checkpoint_dir: Path,
    *,
    module,
    optimizer,
    scheduler,
    trainer_state: dict,
    distributed: bool,
    rank: int,
    world_size: int,
    keep: int = 1,
) -> Path | None:
    """Write state-<global step>/ (collective under FSDP: every rank calls it). Returns its path on rank 0."""
    model_state = full_model_state(module, distributed)
    optimizer_state = full_optimizer_state(module, optimizer, distributed)
    rngs = [rng_state()]
    if distributed:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    path = None
    if rank == 0:
        name = f"state-{trainer_state['global_step']:08d}"
        with atomic_output_dir(checkpoint_dir / name, overwrite=True) as tmp:
            unique, aliases = _unique_storage(model_state)
            write_safetensors(tmp, unique, max_shard_bytes=None, metadata={"aliases": json.dumps(aliases)})
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
            write_json(tmp / "rng.json", {"ranks": rngs})
            write_json(tmp / "trainer_state.json", trainer_state)
        write_json(checkpoint_dir / LATEST, {"state": name})
        _prune(checkpoint_dir, keep)
        path = checkpoint_dir / name
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    return path


def _prune(checkpoint_dir: Path, keep: int) -> None:
    states = sorted(checkpoint_dir.glob("state-*"))
    for old in states[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_state_dir(checkpoint_dir: Path) -> Path | None:
    marker = checkpoint_dir / LATEST
    if not marker.is_file():
        return None
    path = checkpoint_dir / read_json(marker)["state"]
    if not (path / "trainer_state.json").is_file():
        raise LongctxError(f"{marker} names {path.name}, which is incomplete; delete {marker} to resume from scratch")
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


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model.safetensors written by save_training_state, with its tied aliases restored."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    state = load_file(path)
    for name, target in aliases.items():
        state[name] = state[target]
    return state


def load_training_state(state_dir: Path, *, module, optimizer, scheduler, distributed: bool, rank: int) -> None:
    """Restore weights, optimizer, scheduler and this rank's RNG from state_dir."""
    load_model_state(module, read_weights(state_dir / "model.safetensors"), distributed)
    saved = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    load_optimizer_state(module, optimizer, saved["optimizer"], distributed)
    scheduler.load_state_dict(saved["scheduler"])
    rngs = read_json(state_dir / "rng.json")["ranks"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])


def load_model_weights(state_dir: Path, module, distributed: bool) -> None:
    """Only the weights of a training state (used to continue after a finished stage)."""
    load_model_state(module, read_weights(state_dir / "model.safetensors"), distributed)


# --- model directories -------------------------------------------------------------------------


def hf_state_dict(module_state: dict[str, torch.Tensor], *, lora_scaling: float | None) -> dict[str, torch.Tensor]:
    """The trained module's state under transformers' names, LoRA merged into the base weights.

    Module names are `model.<causal lm names>` (CausalLMLoss), or with PEFT
    `model.base_model.model.<names>` where a LoRA-wrapped linear holds `base_layer.weight`,
    `lora_A.default.weight` and `lora_B.default.weight`: merged as W + scaling * B @ A.
    """
    state = {name.removeprefix("model."): tensor for name, tensor in module_state.items()}
    if any(name.startswith("base_model.model.") for name in state):
        state = {name.removeprefix("base_model.model."): tensor for name, tensor in state.items()}
    merged = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name or ".lora_dropout" in name:
            continue
        if ".base_layer." in name:
            prefix, _, leaf = name.partition(".base_layer.")
            if leaf == "weight":
                lora_a = state.get(f"{prefix}.lora_A.default.weight")
                lora_b = state.get(f"{prefix}.lora_B.default.weight")
                if lora_a is not None and lora_b is not None:
                    delta = (lora_b.float() @ lora_a.float()) * float(lora_scaling)
                    tensor = (tensor.float() + delta).to(tensor.dtype)
            name = f"{prefix}.{leaf}"
        merged[name] = tensor
    return merged


def write_model_dir(
    dest: Path,
    *,
    weights: dict[str, torch.Tensor],
    config,
    source_dir: Path,
    metadata: dict,
    overwrite: bool = True,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """A save_pretrained-style model directory: sharded safetensors, config, tokenizer, longctx.json."""
    from longctx.models.metadata import write_metadata

    tied = bool(getattr(config, "tie_word_embeddings", False))
    with atomic_output_dir(dest, overwrite=overwrite) as tmp:
        write_safetensors(tmp, {name: tensor for name, tensor in weights.items() if not (tied and name == "lm_head.weight")})
        config.save_pretrained(tmp)
        copy_auxiliary_files(source_dir, tmp)
        if config.max_position_embeddings != read_json(Path(source_dir) / "config.json").get("max_position_embeddings"):
            set_model_max_length(tmp, config.max_position_embeddings)
        write_metadata(tmp, **metadata)
        for name, path in (extra_files or {}).items():
            if Path(path).is_file():
                shutil.copy2(path, tmp / name)
    return dest


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
