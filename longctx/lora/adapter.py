"""A PEFT LoRA adapter read into memory: its config as PEFT reads it, and its factors.

The split is PEFT's: the on-disk format (file names, tensor keys, config fields) is
longctx.lora.adapter_format; here are the config's meaning (which adapters can be merged
at all, each module's rank, alpha and scaling) and the layer math of one LoRA module
(delta = scaling * B @ A, transposed for embeddings and fan_in_fan_out layers). Merging
(lora.merge) and combining (lora.combine) both start from `load_adapters`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from longctx.errors import LongctxError
from longctx.lora.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    KEY_PREFIX,
    pattern_value,
    read_adapter_config,
    split_lora_key,
)
from longctx.models.metadata import read_metadata

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

# PEFT initialisations that change the base weights: such an adapter only fits its own residual base.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


# ---------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------


def read_lora_config(adapter_dir: Path) -> LoraConfig:
    """adapter_config.json read by PEFT's own loader, which fills in its defaults and checks
    the fields; keys that this PEFT version does not know (written by a newer one) are
    dropped with a warning, as PeftModel.from_pretrained drops them."""
    peft_type = str(read_adapter_config(adapter_dir).get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LongctxError(f"{adapter_dir} is a {peft_type} adapter; only LoRA adapters can be merged")
    from peft import LoraConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = LoraConfig.from_pretrained(str(adapter_dir))
        except (TypeError, ValueError) as error:
            raise LongctxError(f"{adapter_dir / ADAPTER_CONFIG} is not a valid LoRA config: {error}") from error
    for warning in caught:
        log.warning("warning: %s: %s", adapter_dir / ADAPTER_CONFIG, warning.message)
    return config


def check_mergeable_config(config: LoraConfig, adapter_dir: Path) -> None:
    """Refuse adapter types whose effect is not W + scaling * B A."""
    if config.use_dora:
        raise LongctxError(
            f"{adapter_dir} is a DoRA adapter (use_dora: true), whose merge depends on weight norms; "
            "merge it with PEFT's merge_and_unload, or train a plain LoRA"
        )
    if config.target_parameters:
        raise LongctxError(f"{adapter_dir} targets raw parameters (target_parameters), which cannot be merged here; use PEFT")
    if config.alora_invocation_tokens:
        raise LongctxError(f"{adapter_dir} is an activated LoRA (alora_invocation_tokens), which cannot be merged into weights")
    if config.layer_replication:
        raise LongctxError(f"{adapter_dir} uses layer_replication, which changes the model's layers; merge it with PEFT")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise LongctxError(
            f"{adapter_dir} was initialised with {init}, which changes the base weights; convert it to a plain LoRA "
            "when saving (PEFT's path_initial_model_for_weight_conversion) and merge that"
        )


def module_rank_alpha(config: LoraConfig, module: str) -> tuple[int, float]:
    rank = pattern_value(config.rank_pattern, module, config.r)
    alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
    return int(rank), float(alpha)


def module_scaling(config: LoraConfig, module: str) -> float:
    """PEFT's scaling of one module: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    rank, alpha = module_rank_alpha(config, module)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


# ---------------------------------------------------------------------------------------
# The layer math of one module
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


def stack_factors(terms: list[tuple[float, LoraFactors]], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, B) with B @ A = Σ w * scaling * B_i @ A_i exactly: A = [w s A_i] stacked on
    rows, B = [B_i] on columns (PEFT's `cat` combination)."""
    A = torch.cat([factors.A.to(device, torch.float32) * (weight * factors.scaling) for weight, factors in terms])
    B = torch.cat([factors.B.to(device, torch.float32) for _, factors in terms], dim=1)
    return A, B


def add_lora_deltas_(target: torch.Tensor, terms: list[tuple[float, LoraFactors]]) -> torch.Tensor:
    """target += Σ w * scaling * B @ A over terms of one layout, in place, in one pass over target:
    with the factors stacked, one matmul adds every delta however many adapters touch it."""
    A, B = stack_factors(terms, target.device)
    if terms[0][1].transposed:  # embeddings and fan_in_fan_out: (B A)^T = A^T B^T
        return target.addmm_(A.T, B.T)
    return target.addmm_(B, A)


# ---------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A PEFT LoRA adapter read into memory (adapters are small next to the model)."""

    path: Path
    config: LoraConfig
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


def _load_adapter_tensors(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        try:
            return load_file(adapter_dir / ADAPTER_WEIGHTS)
        except (SafetensorError, OSError) as error:
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
    config = read_lora_config(adapter_dir)
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
        if "bias" in found and not config.lora_bias:
            raise LongctxError(f"{adapter_dir}: module {module} has lora_B.bias but lora_bias is not set in the config")
        loras[module] = LoraFactors(
            A=A,
            B=B,
            scaling=module_scaling(config, module),
            embedding=module in embedding_modules,
            fan_in_fan_out=bool(config.fan_in_fan_out) and module not in embedding_modules,
            bias=found.get("bias"),
        )
    if not loras and not saved_modules and not base_layer_tensors:
        raise LongctxError(f"{adapter_dir} holds no LoRA tensors; nothing to merge")
    return Adapter(adapter_dir, config, loras, base_layer_tensors, saved_modules, read_metadata(adapter_dir))


def adapter_inputs(paths: Iterable[str | Path]) -> dict[str, Path]:
    """The adapters as inputs an output must not overlap (check_output_free)."""
    return {f"adapter #{number}": Path(path) for number, path in enumerate(paths, 1)}


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
    messages = []
    owners: dict[str, str] = {}
    for adapter in adapters:
        for module in adapter.modules_to_save():
            if module in owners:
                messages.append(
                    f"{module} is saved in full by both {owners[module]} and {adapter.name}: the later one ({adapter.name}) wins"
                )
            owners[module] = adapter.name
    return messages


# ---------------------------------------------------------------------------------------
# Rope settings carried by adapters (longctx.json beside adapter_config.json)
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
    messages = [
        f"adapters disagree on rope settings: {other.source} has {other.rope_parameters} / {other.max_position_embeddings}, "
        f"{chosen.source} has {chosen.rope_parameters} / {chosen.max_position_embeddings}; using {chosen.source}'s (the last)"
        for other in carried[:-1]
        if (other.rope_parameters, other.max_position_embeddings) != (chosen.rope_parameters, chosen.max_position_embeddings)
    ]
    return chosen, messages
