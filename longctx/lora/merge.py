"""Merge LoRA adapters into a base model, streaming and exact.

For every LoRA module of every adapter i, W = W_base + sum_i w_i * scaling_i * B_i A_i,
computed in float32 and cast once to the output dtype (PEFT's merge_and_unload casts
after every adapter). The base model is read tensor by tensor and written tensor by
tensor: the output layout (names, shapes, dtypes) is known before the first byte is
written, so each safetensors header is written first and each tensor goes to disk as
soon as it is computed. Peak memory is the adapters plus a few tensors, not the model.

What PEFT's sequential `PeftModel.from_pretrained(...).merge_and_unload()` does and we
reproduce, adapter by adapter, in order:
- `modules_to_save` copies replace the module: the last adapter wins (we warn);
- with tied embeddings (lm_head shares the input embedding), deltas and in-place loads on
  either module change both, and a `modules_to_save` copy of one of them unties them: the
  output then holds both tensors and `tie_word_embeddings: false`, as PEFT's
  save_pretrained writes it.
Where we differ from PEFT on purpose: an adapter with an embedding LoRA also saves its own
copy of the embedding (`<module>.base_layer.weight`), which PEFT loads over the model's before
merging, so a later embedding adapter silently erases an earlier adapter's embedding delta
(and a sibling fine-tune's own embedding). We add every delta to the base model's embedding, as
the formula above says, and warn when an adapter's copy differs from the base's.
Everything is checked before the output directory is created.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longctx.errors import LongctxError
from longctx.lora.adapter import (
    adapter_inputs,
    Adapter,
    LoraFactors,
    RopeSettings,
    add_lora_deltas_,
    adapter_rope_settings,
    check_weights,
    load_adapters,
    warn_saved_twice,
)
from longctx.models.dtypes import DTYPE_NAMES, dtype_name, torch_dtype
from longctx.models.metadata import write_metadata
from longctx.models.output import (
    atomic_output_dir, check_output_free, copy_auxiliary_files, read_json, set_model_max_length, write_json,
)
from longctx.models.tensors import TensorReader
from longctx.models.writer import DEFAULT_MAX_SHARD_BYTES, SafetensorsWriter, tensor_nbytes

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# The merge plan: what happens to each output tensor, decided and checked before writing
# ---------------------------------------------------------------------------------------


@dataclass
class Op:
    """One step on an output tensor: add weight * delta, or set it to a full tensor."""

    kind: str  # "add" | "set"
    factors: LoraFactors | None = None  # for "add" of a weight delta
    tensor: torch.Tensor | None = None  # for "set", or "add" of a lora_B.bias (already scaled by the caller)
    weight: float = 1.0


@dataclass
class MergePlan:
    # Output tensors in order: name -> (source tensor in the base checkpoint, ops)
    tensors: dict[str, tuple[str, list[Op]]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    untied: list[str] = field(default_factory=list)  # tied tensors written separately now
    warnings: list[str] = field(default_factory=list)
    # base tensor -> [(adapter, its saved copy of that tensor)], compared with the base while streaming
    base_copies: dict[str, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)

    def changed(self) -> list[str]:
        return [name for name, (_, ops) in self.tensors.items() if ops]


def tied_weights(config, base_names: set[str]) -> dict[str, str]:
    """{tied tensor: the tensor it shares} for a model with tied embeddings, from transformers' model class."""
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)]
    pairs = {}
    for architecture in filter(None, architectures):
        keys = getattr(getattr(transformers, architecture, None), "_tied_weights_keys", None)
        if isinstance(keys, dict):
            pairs.update({target: source for target, source in keys.items() if source in base_names})
    return pairs


class _Slots:
    """Op lists per base tensor, with tied tensors sharing one list until something unties them."""

    def __init__(self, ties: dict[str, str]):
        self.ops: dict[str, list[Op]] = {}
        self.partner = {**ties, **{source: target for target, source in ties.items()}}
        self.tied = set(self.partner)

    def get(self, name: str) -> list[Op]:
        return self.ops.setdefault(name, [])

    def apply(self, name: str, op: Op) -> None:
        """An in-place change: seen through both names while they are tied."""
        self.get(name).append(op)
        if name in self.tied:
            self.get(self.partner[name]).append(op)

    def replace_module(self, name: str, op: Op, *, keep_tie: bool = False) -> None:
        """A modules_to_save copy: a new parameter, so a tie through this name is broken,
        unless the adapter asks PEFT to keep it (ensure_weight_tying: the copy serves both)."""
        self.ops[name] = [op]
        if name in self.tied:
            if keep_tie:
                self.ops[self.partner[name]] = [op]
            else:
                self.tied -= {name, self.partner[name]}


def plan_merge(
    reader: TensorReader,
    adapters: list[Adapter],
    weights: list[float],
    *,
    ties: dict[str, str] | None = None,
    out_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Decide every output tensor's ops and check every adapter against the base (no tensor data read)."""
    ties = ties or {}
    base_names = reader.names()
    present = set(base_names)
    known = present | set(ties)

    def base_shape(name: str) -> tuple[int, ...]:
        return tuple(reader.shape(ties.get(name, name) if name not in present else name))

    def require(adapter: Adapter, tensor_name: str, shape: tuple[int, ...], what: str) -> None:
        if tensor_name not in known:
            raise LongctxError(
                f"{adapter.path}: {what} {tensor_name.rsplit('.', 1)[0]} is not in the base model; "
                "the adapter was trained on a different architecture"
            )
        if base_shape(tensor_name) != tuple(shape):
            raise LongctxError(
                f"{adapter.path}: {what} {tensor_name} has shape {tuple(shape)} but the base model's is "
                f"{base_shape(tensor_name)}; the adapter was trained on a different model size or vocabulary"
            )

    slots = _Slots(ties)
    base_copies: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for adapter, weight in zip(adapters, weights):
        for name, tensor in adapter.base_layer_tensors.items():
            require(adapter, name, tensor.shape, "saved base layer")
            base_copies.setdefault(name, []).append((adapter.name, tensor))
        for module, factors in adapter.loras.items():
            require(adapter, f"{module}.weight", factors.delta_shape(), "LoRA module")
            slots.apply(f"{module}.weight", Op("add", factors=factors, weight=weight))
            if factors.bias is not None:
                require(adapter, f"{module}.bias", factors.bias.shape, "LoRA bias of")
                slots.apply(f"{module}.bias", Op("add", tensor=factors.bias.float() * factors.scaling, weight=weight))
        for name, tensor in adapter.saved_modules.items():
            require(adapter, name, tensor.shape, "module to save")
            slots.replace_module(name, Op("set", tensor=tensor), keep_tie=bool(adapter.config.ensure_weight_tying))

    untied = sorted(target for target, source in ties.items() if target not in slots.tied)
    output_names = list(base_names)
    for target in untied:
        if target not in present:
            output_names.insert(output_names.index(ties[target]) + 1, target)
    tensors = {name: (ties.get(name, name) if name not in present else name, slots.get(name)) for name in output_names}
    shapes = {name: base_shape(name) for name in output_names}
    dtypes = {}
    for name, (source, _) in tensors.items():
        dtype = reader.dtype(source)
        dtypes[name] = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
    warnings = warn_saved_twice(adapters)
    if untied:
        warnings.append(
            f"untying {', '.join(f'{target} from {ties[target]}' for target in untied)} (an adapter saves one of them in full): "
            "writing both and tie_word_embeddings: false, as PEFT does"
        )
    return MergePlan(tensors, shapes, dtypes, untied, warnings, base_copies)


def apply_ops(base: torch.Tensor, ops: list[Op], *, device: str | torch.device = "cpu") -> torch.Tensor:
    """Run a tensor's ops in float32 on device; returns a float32 CPU tensor (the caller casts once).
    base may be changed in place."""
    result = base.to(device, torch.float32)
    pending: list[tuple[float, LoraFactors]] = []  # consecutive deltas of one layout, added together

    def flush() -> None:
        if pending:
            add_lora_deltas_(result, pending)
            pending.clear()

    for op in ops:
        if op.factors is not None:
            if pending and pending[0][1].transposed != op.factors.transposed:
                flush()
            pending.append((op.weight, op.factors))
            continue
        flush()
        if op.kind == "set":
            result = op.tensor.to(device, torch.float32, copy=True)
        else:
            result.add_(op.tensor.to(device), alpha=op.weight)
    flush()
    return result.cpu()


# ---------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    output_dir: Path
    adapters: list[str]
    weights: list[float]
    changed_tensors: int
    total_tensors: int
    output_bytes: int
    shard_files: list[str]
    dtype: str
    rope: RopeSettings | None
    rope_skipped: RopeSettings | None  # carried but not applied (--keep-base-config)
    untied: list[str]
    warnings: list[str]
    seconds: float


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise LongctxError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)} or auto (the base model's)")
    return torch_dtype(name)


def merged_config(base_config: dict, plan: MergePlan, *, out_dtype: torch.dtype | None, rope: RopeSettings | None) -> dict:
    config = dict(base_config)
    if out_dtype is not None:
        config.pop("torch_dtype", None)
        config["dtype"] = dtype_name(out_dtype)
    if plan.untied:
        config["tie_word_embeddings"] = False
    if rope is not None:
        from longctx.rope.config import apply_rope_settings

        config = apply_rope_settings(config, rope.rope_parameters, rope.max_position_embeddings)
    return config


def merge_adapters(
    base_model: str | Path,
    adapter_paths: list[str | Path],
    output_dir: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    keep_base_config: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> MergeResult:
    """Merge LoRA adapters into base_model and write the merged model to output_dir."""
    from tqdm import tqdm
    from transformers import AutoConfig

    from longctx.models.reference import resolve_device, resolve_model

    started = time.perf_counter()
    from longctx.models.reference import reference_path

    check_output_free(output_dir, overwrite, inputs={"the base model": reference_path(base_model), **adapter_inputs(adapter_paths)})
    base_dir = resolve_model(base_model)
    device = resolve_device(device)
    out_dtype = parse_dtype(dtype)
    adapters = load_adapters(adapter_paths, allow_pickle=allow_pickle)
    weights = check_weights(weights, len(adapters))
    rope, rope_warnings = adapter_rope_settings(adapters)
    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise LongctxError(f"cannot read the config of {base_dir}: {error}") from error
    base_config = read_json(Path(base_dir) / "config.json")

    with TensorReader(base_dir, allow_pickle=allow_pickle) as reader:
        plan = plan_merge(reader, adapters, weights, ties=tied_weights(config, set(reader.names())), out_dtype=out_dtype)
        plan.warnings.extend(rope_warnings)
        applied = None if keep_base_config else rope
        new_config = merged_config(base_config, plan, out_dtype=out_dtype, rope=applied)
        for warning in plan.warnings:
            log.warning("warning: %s", warning)

        layout = {name: (plan.shapes[name], plan.dtypes[name]) for name in plan.tensors}
        expected = sum(tensor_nbytes(*entry) for entry in layout.values())
        with atomic_output_dir(output_dir, overwrite=overwrite, expected_bytes=expected) as tmp:
            bar = tqdm(total=sum(tensor_nbytes(*entry) for entry in layout.values()), unit="B", unit_scale=True,
                       desc="merging", disable=not progress)
            with SafetensorsWriter(tmp, layout, max_shard_bytes=max_shard_bytes) as writer:
                for name, (shape, dtype) in layout.items():
                    source, ops = plan.tensors[name]
                    if not reader.is_pickle and not ops and reader.dtype(source) == dtype and source not in plan.base_copies:
                        writer.copy(name, reader.location(source))  # unchanged: bytes go from file to file
                        bar.update(tensor_nbytes(shape, dtype))
                        continue
                    tensor = reader.get(source)
                    for adapter_name, copy in plan.base_copies.pop(source, []):
                        if not torch.equal(copy.to(tensor.dtype), tensor):
                            warning = (
                                f"{adapter_name} was trained on a different {source} than the base model's: adding its delta "
                                "to the base model's (PEFT would load the adapter's copy over it)"
                            )
                            log.warning("warning: %s", warning)
                            plan.warnings.append(warning)
                    if ops:
                        tensor = apply_ops(tensor, ops, device=device)
                    writer.write(name, tensor.to(dtype))
                    bar.update(tensor_nbytes(shape, dtype))
            bar.close()
            write_json(tmp / "config.json", new_config)
            copy_auxiliary_files(base_dir, tmp)
            if applied is not None:
                set_model_max_length(tmp, applied.max_position_embeddings)
                write_metadata(
                    tmp,
                    "merged-model",
                    rope_parameters=new_config.get("rope_parameters", applied.rope_parameters),
                    max_position_embeddings=applied.max_position_embeddings,
                    base_model=str(base_model),
                    adapters=[{"path": str(a.path), "weight": w} for a, w in zip(adapters, weights)],
                    rope_from=applied.source,
                )
    return MergeResult(
        output_dir=Path(output_dir),
        adapters=[str(adapter.path) for adapter in adapters],
        weights=weights,
        changed_tensors=len(plan.changed()),
        total_tensors=len(plan.tensors),
        output_bytes=writer.total_bytes,
        shard_files=writer.files,
        dtype=dtype_name(out_dtype) if out_dtype else ", ".join(sorted({dtype_name(d) for d in plan.dtypes.values()})),
        rope=applied,
        rope_skipped=rope if keep_base_config else None,
        untied=plan.untied,
        warnings=plan.warnings,
        seconds=time.perf_counter() - started,
    )
