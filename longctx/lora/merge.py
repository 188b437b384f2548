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
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longctx.errors import LongctxError
from longctx.lora.adapter_format import (
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    KEY_PREFIX,
    module_rank_alpha,
    module_scaling,
    read_adapter_config,
    split_lora_key,
)
from longctx.models.dtypes import DTYPE_NAMES, dtype_name, torch_dtype
from longctx.models.metadata import read_metadata, write_metadata
from longctx.models.output import atomic_output_dir, check_output_free, copy_auxiliary_files, read_json, write_json
from longctx.models.tensors import TensorReader
from longctx.models.writer import DEFAULT_MAX_SHARD_BYTES, SafetensorsWriter, tensor_nbytes

log = logging.getLogger(__name__)

# PEFT initialisations that change the base weights: such an adapter only fits its own residual base.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")

# ---------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------


@dataclass
class LoraFactors:
    """One LoRA module of one adapter: delta = scaling * B @ A, in the base weight's layout."""

    A: torch.Tensor  # r x in (lora_embedding_A: r x num_embeddings)
    B: torch.Tensor  # out x r (lora_embedding_B: embedding_dim x r)
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias: true)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def transposed(self) -> bool:
        """PEFT transposes B @ A for embeddings and for fan_in_fan_out (Conv1D) layers."""
        return self.embedding or self.fan_in_fan_out

    def delta_shape(self) -> tuple[int, int]:
        out_dim, in_dim = self.B.shape[0], self.A.shape[1]
        return (in_dim, out_dim) if self.transposed else (out_dim, in_dim)


def add_lora_deltas_(target: torch.Tensor, terms: list[tuple[float, LoraFactors]]) -> torch.Tensor:
    """target += Σ w * scaling * B @ A over terms of one layout, in place, in one pass over target.

    The factors are stacked (A: [w s A_i], B: [B_i]) so one matmul adds every delta: the
    target is read and written once, however many adapters touch it."""
    A = torch.cat([factors.A.to(target.device, torch.float32) * (weight * factors.scaling) for weight, factors in terms])
    B = torch.cat([factors.B.to(target.device, torch.float32) for _, factors in terms], dim=1)
    if terms[0][1].transposed:  # embeddings and fan_in_fan_out: (B A)^T = A^T B^T
        return target.addmm_(A.T, B.T)
    return target.addmm_(B, A)


@dataclass
class Adapter:
    """A PEFT LoRA adapter read into memory (adapters are small next to the model)."""

    path: Path
    config: dict
    loras: dict[str, LoraFactors]  # module name -> factors
    base_layer_tensors: dict[str, torch.Tensor]  # base tensor name -> the adapter's copy of that base weight
    saved_modules: dict[str, torch.Tensor]  # base tensor name -> modules_to_save copy (replaces the module)
    metadata: dict | None = None  # longctx.json, when the adapter has one

    @property
    def name(self) -> str:
        return self.path.name

    def modules_to_save(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[0] for name in self.saved_modules})

    def ranks(self) -> list[int]:
        return sorted({factors.rank for factors in self.loras.values()})


def check_mergeable_config(config: dict, adapter_dir: Path) -> None:
    """Refuse adapter types whose effect is not W + scaling * B A."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LongctxError(f"{adapter_dir} is a {peft_type} adapter; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise LongctxError(
            f"{adapter_dir} is a DoRA adapter (use_dora: true), whose merge depends on weight norms; "
            "merge it with PEFT's merge_and_unload, or train a plain LoRA"
        )
    if config.get("target_parameters"):
        raise LongctxError(f"{adapter_dir} targets raw parameters (target_parameters), which cannot be merged here; use PEFT")
    if config.get("alora_invocation_tokens"):
        raise LongctxError(f"{adapter_dir} is an activated LoRA (alora_invocation_tokens), which cannot be merged into weights")
    if config.get("layer_replication"):
        raise LongctxError(f"{adapter_dir} uses layer_replication, which changes the model's layers; merge it with PEFT")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise LongctxError(
            f"{adapter_dir} was initialised with {init}, which changes the base weights; convert it to a plain LoRA "
            "when saving (PEFT's path_initial_model_for_weight_conversion) and merge that"
        )


def _load_adapter_tensors(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        try:
            return load_file(adapter_dir / ADAPTER_WEIGHTS)
        except Exception as error:  # safetensors raises its own error types
            raise LongctxError(f"cannot read {adapter_dir / ADAPTER_WEIGHTS}: {error}; the file is corrupt or truncated") from error
    if (adapter_dir / ADAPTER_WEIGHTS_PICKLE).is_file():
        if not allow_pickle:
            raise LongctxError(
                f"{adapter_dir} holds a pickle adapter ({ADAPTER_WEIGHTS_PICKLE}), which can run code when loaded; "
                "pass --allow-pickle if you trust it, or re-save it as safetensors"
            )
        return torch.load(adapter_dir / ADAPTER_WEIGHTS_PICKLE, map_location="cpu", weights_only=True)
    raise LongctxError(f"{adapter_dir} has no adapter weights: expected {ADAPTER_WEIGHTS}")


def load_adapter(adapter_dir: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read and validate one PEFT LoRA adapter directory."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LongctxError(f"adapter {adapter_dir} does not exist; give a local PEFT adapter directory")
    config = read_adapter_config(adapter_dir)
    check_mergeable_config(config, adapter_dir)
    tensors = _load_adapter_tensors(adapter_dir, allow_pickle)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding_modules: set[str] = set()
    base_layer_tensors: dict[str, torch.Tensor] = {}
    saved_modules: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise LongctxError(f"{adapter_dir}: unexpected tensor {key} (PEFT keys start with {KEY_PREFIX}); the adapter is not in PEFT's format")
        name = key[len(KEY_PREFIX):]
        lora_part = split_lora_key(name)
        if lora_part is not None:
            module, role, embedding = lora_part
            parts.setdefault(module, {})[role] = tensor
            if embedding:
                embedding_modules.add(module)
        elif "lora_magnitude_vector" in name:
            raise LongctxError(f"{adapter_dir} holds DoRA magnitudes ({key}); only plain LoRA adapters can be merged")
        elif ".lora_" in name or "trainable_tokens" in name:
            raise LongctxError(f"{adapter_dir}: tensor {key} is of a LoRA variant that cannot be merged here; use PEFT")
        elif ".base_layer." in name:
            base_layer_tensors[name.replace(".base_layer.", ".")] = tensor
        else:
            saved_modules[name] = tensor

    loras = {}
    for module, found in parts.items():
        if "A" not in found or "B" not in found:
            missing = "lora_B" if "A" in found else "lora_A"
            raise LongctxError(f"{adapter_dir}: module {module} has no {missing} tensor; the adapter is incomplete")
        rank, _ = module_rank_alpha(config, module)
        A, B = found["A"], found["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise LongctxError(f"{adapter_dir}: module {module} is not a linear or embedding LoRA (lora_A has {A.ndim} dims); only those can be merged")
        if A.shape[0] != rank or B.shape[1] != rank:
            raise LongctxError(
                f"{adapter_dir}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} but the config "
                f"says rank {rank}; the adapter config does not match its weights"
            )
        if "bias" in found and not config.get("lora_bias"):
            raise LongctxError(f"{adapter_dir}: module {module} has lora_B.bias but lora_bias is not set in the config")
        loras[module] = LoraFactors(
            A=A,
            B=B,
            scaling=module_scaling(config, module),
            embedding=module in embedding_modules,
            fan_in_fan_out=bool(config.get("fan_in_fan_out")) and module not in embedding_modules,
            bias=found.get("bias"),
        )
    if not loras and not saved_modules and not base_layer_tensors:
        raise LongctxError(f"{adapter_dir} holds no LoRA tensors; nothing to merge")
    return Adapter(adapter_dir, config, loras, base_layer_tensors, saved_modules, read_metadata(adapter_dir))


def load_adapters(paths: Iterable[str | Path], *, allow_pickle: bool = False) -> list[Adapter]:
    paths = [Path(path) for path in paths]
    if not paths:
        raise LongctxError("no adapters given; pass at least one adapter directory")
    return [load_adapter(path, allow_pickle=allow_pickle) for path in paths]


def check_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise LongctxError(f"{len(weights)} weights for {count} adapters; give one weight per adapter (--weights)")
    if not all(math.isfinite(weight) for weight in weights):
        raise LongctxError("weights must be finite numbers")
    return [float(weight) for weight in weights]


def warn_saved_twice(adapters: list[Adapter]) -> list[str]:
    """modules_to_save of a later adapter replace an earlier one's: say which, since the earlier is lost."""
    warnings = []
    owners: dict[str, str] = {}
    for adapter in adapters:
        for module in adapter.modules_to_save():
            if module in owners:
                warnings.append(
                    f"{module} is saved in full by both {owners[module]} and {adapter.name}: the later one ({adapter.name}) wins"
                )
            owners[module] = adapter.name
    return warnings


# ---------------------------------------------------------------------------------------
# Rope settings carried by adapters
# ---------------------------------------------------------------------------------------


@dataclass
class RopeSettings:
    rope_parameters: dict
    max_position_embeddings: int
    source: str  # the adapter they came from


def adapter_rope_settings(adapters: list[Adapter]) -> tuple[RopeSettings | None, list[str]]:
    """The rope settings to apply (the last adapter carrying them wins) and warnings when adapters disagree."""
    carried = [
        RopeSettings(adapter.metadata["rope_parameters"], int(adapter.metadata["max_position_embeddings"]), adapter.name)
        for adapter in adapters
        if adapter.metadata and adapter.metadata.get("rope_parameters") and adapter.metadata.get("max_position_embeddings")
    ]
    if not carried:
        return None, []
    chosen = carried[-1]
    warnings = [
        f"adapters disagree on rope settings: {other.source} has {other.rope_parameters} / {other.max_position_embeddings}, "
        f"{chosen.source} has {chosen.rope_parameters} / {chosen.max_position_embeddings}; using {chosen.source}'s (the last)"
        for other in carried[:-1]
        if (other.rope_parameters, other.max_position_embeddings) != (chosen.rope_parameters, chosen.max_position_embeddings)
    ]
    return chosen, warnings


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
            slots.replace_module(name, Op("set", tensor=tensor), keep_tie=bool(adapter.config.get("ensure_weight_tying")))

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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongctxError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError as error:
        raise LongctxError(f"--device {device!r} is not a device ({error}); use cpu, cuda or auto") from error
    return device


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

    from longctx.models.reference import resolve_model

    started = time.perf_counter()
    check_output_free(output_dir, overwrite)
    base_dir = resolve_model(base_model)
    device = resolve_device(device)
    out_dtype = parse_dtype(dtype)
    adapters = load_adapters(adapter_paths, allow_pickle=allow_pickle)
    weights = check_weights(weights, len(adapters))
    rope, rope_warnings = adapter_rope_settings(adapters)
    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    except Exception as error:
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
        with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
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
