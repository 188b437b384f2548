"""PEFT's LoRA on-disk format, followed exactly (peft/tuners/lora, peft/utils/save_and_load.py).

What the files hold and how their names and fields are spelled; nothing here imports torch
or peft. The adapter read into memory (config semantics, the factors) is longctx.lora.adapter.

An adapter directory holds adapter_config.json and adapter_model.safetensors with keys
  base_model.model.<module>.lora_A.weight            (r x in)
  base_model.model.<module>.lora_B.weight            (out x r)
  base_model.model.<module>.lora_embedding_A         (r x num_embeddings)   embeddings
  base_model.model.<module>.lora_embedding_B         (embedding_dim x r)
  base_model.model.<module>.lora_B.bias              (out,)  with lora_bias: true
  base_model.model.<module>.weight                   full copies of modules_to_save
scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), where r and lora_alpha
come from rank_pattern / alpha_pattern when a key there matches the module name.
"""

from __future__ import annotations

import re
from pathlib import Path

from longctx.errors import LongctxError
from longctx.models.output import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# The LoRA tensors of one module: the key's ending -> (the factor it holds, whether the module is an embedding)
LORA_PARTS = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_B.bias": ("bias", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}


def lora_key(module: str, role: str, *, embedding: bool = False) -> str:
    """Key of one LoRA tensor of a module: role "A", "B", or "bias" (linear layers only)."""
    part = next(part for part, found in LORA_PARTS.items() if found == (role, embedding))
    return f"{KEY_PREFIX}{module}.{part}"


def split_lora_key(name: str) -> tuple[str, str, bool] | None:
    """(module, role, embedding) of a LoRA tensor's key without KEY_PREFIX; None for any other tensor."""
    for part, (role, embedding) in LORA_PARTS.items():
        if name.endswith("." + part):
            return name[: -len(part) - 1], role, embedding
    return None


def full_module_key(module: str, tensor: str = "weight") -> str:
    """Key of a modules_to_save tensor as PEFT saves it (the wrapper's name is stripped)."""
    return f"{KEY_PREFIX}{module}.{tensor}"


def base_layer_key(base_tensor: str) -> str:
    """Key of an adapter's copy of the base weight under a LoRA layer (PEFT saves it for embedding LoRAs)."""
    module, leaf = base_tensor.rsplit(".", 1)
    return f"{KEY_PREFIX}{module}.base_layer.{leaf}"


def matches_target(module: str, target: str) -> bool:
    """PEFT's rule for a target_modules list entry: the module's full name or a dotted suffix of it."""
    return module == target or module.endswith("." + target)


def matches_saved(module: str, entry: str) -> bool:
    """PEFT's rule for a modules_to_save entry: the module's name ends with it."""
    return module.endswith(entry)


def peft_names(selected: set[str], all_modules: list[str], matches) -> list[str]:
    """Short PEFT names for a set of modules: a last name segment where it matches exactly
    modules in the set, full names otherwise (so no unintended module is wrapped)."""
    names: list[str] = []
    by_segment: dict[str, list[str]] = {}
    for module in sorted(selected):
        by_segment.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    for segment, modules in by_segment.items():
        if all(m in selected for m in all_modules if matches(m, segment)):
            names.append(segment)
            continue
        for module in modules:
            if not all(m in selected for m in all_modules if matches(m, module)):
                raise LongctxError(f"module {module} cannot be named for PEFT without also matching other modules")
            names.append(module)
    return sorted(names)


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with module ~ (.*\\.)?(k)$."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def rank_fields(ranks: dict[str, int]) -> dict:
    """r, lora_alpha, rank_pattern and alpha_pattern for per-module ranks, with scaling 1
    (lora_alpha = r for every module).

    r is the most common rank (ties: the largest), so rank_pattern lists only the exceptions,
    as few as any choice of r allows: the config stays short and PEFT, which tries every
    pattern key on every module it wraps, has the fewest to try. Pattern keys are escaped
    full module names, which PEFT matches literally.
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    default_rank = max(counts, key=lambda rank: (counts[rank], rank)) if counts else 1
    exceptions = {re.escape(module): rank for module, rank in ranks.items() if rank != default_rank}
    return {"r": default_rank, "lora_alpha": default_rank, "rank_pattern": exceptions, "alpha_pattern": dict(exceptions)}


def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise LongctxError(f"{adapter_dir} is not a PEFT adapter: {ADAPTER_CONFIG} is missing")
    return read_json(adapter_dir / ADAPTER_CONFIG)


def lora_adapter_config(
    *,
    base_model: str,
    ranks: dict[str, int],
    target_modules: list[str],
    modules_to_save: list[str] | None,
    lora_bias: bool = False,
    ensure_weight_tying: bool = False,
) -> dict:
    """adapter_config.json for extracted factors: scaling 1 everywhere (see rank_fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        **rank_fields(ranks),
        "target_modules": sorted(target_modules),
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "ensure_weight_tying": ensure_weight_tying,
        "inference_mode": True,
    }
