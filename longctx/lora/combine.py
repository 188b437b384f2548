"""Combine several LoRA adapters into one PEFT adapter (`longctx merge-adapters --combine`).

Methods, for the adapters i touching a module, with weights w_i and ΔW_i = scaling_i B_i A_i:
- cat, linear: Σ w_i ΔW_i exactly, stored by stacking the factors: A = [w_i s_i A_i], B = [B_i]
  (rank Σ r_i). `cat` is PEFT's cat, factor for factor. PEFT's `linear` instead averages the
  A's and the B's separately (√|w s| on each), which adds cross terms B_i A_j and needs equal
  ranks; ours is the weighted sum its name promises.
- svd: Σ w_i ΔW_i truncated by SVD to `svd_rank` (default: the largest input rank): PEFT's svd.
- ties, dare_linear, dare_ties: TIES / DARE on the full ΔW_i (PEFT's merge_utils, same maths), then
  truncated by SVD like svd. PEFT's plain `ties` / `dare_*` prune the A and B factors instead, a
  different (and rank-coupled) operation; ours equal PEFT's `ties_svd`, `dare_linear_svd`,
  `dare_ties_svd`. DARE's random masks come from a generator seeded per module (seed, module name),
  so a module's result does not depend on which other modules exist or their order.
The combined adapter has scaling 1 everywhere (lora_alpha = r, per-module rank_pattern and
alpha_pattern), targets exactly the modules the inputs touch, and keeps modules_to_save (the last
adapter's copy wins, with a warning). Rope metadata carried by the inputs is carried over.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.errors import LongctxError
from longctx.lora.adapter import (
    adapter_inputs,
    Adapter,
    LoraFactors,
    RopeSettings,
    adapter_rope_settings,
    check_weights,
    load_adapters,
    stack_factors,
    warn_saved_twice,
)
from longctx.lora.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    base_layer_key,
    full_module_key,
    lora_key,
    rank_fields,
    read_adapter_config,
)
from longctx.lora.choices import COMBINE_METHODS
from longctx.models.metadata import write_metadata
from longctx.models.output import atomic_output_dir, check_output_free, write_json
from longctx.models.writer import write_safetensors

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The maths on full deltas (tensors stacked on dim 0), as in PEFT's merge_utils
# ---------------------------------------------------------------------------------------


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=keep).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability density, rescale by 1 / density."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    magnitude = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0)
    return stacked.sign() == majority


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the entries that agree with the elected sign."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def _weighted(stacked: torch.Tensor, weights: list[float]) -> torch.Tensor:
    return stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.ndim - 1)))


def combine_deltas(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One full combined delta from each adapter's full delta (svd, ties, dare_linear, dare_ties)."""
    if method in ("dare_linear", "dare_ties"):
        deltas = [random_prune(delta, density, generator) for delta in deltas]
    elif method == "ties":
        deltas = [magnitude_prune(delta, density) for delta in deltas]
    stacked = torch.stack(deltas)
    if method in ("ties", "dare_ties"):
        return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign))
    return _weighted(stacked, weights).sum(dim=0)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of delta (B carries the singular values)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.numel())
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()


def module_seed(seed: int, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------
# Adapters in, adapter out
# ---------------------------------------------------------------------------------------


@dataclass
class CombineResult:
    output_dir: Path
    method: str
    adapters: list[str]
    weights: list[float]
    modules: int
    ranks: list[int]
    modules_to_save: list[str]
    rope: RopeSettings | None
    warnings: list[str]


def _entries_by_module(adapters: list[Adapter], weights: list[float]) -> dict[str, list[tuple[float, LoraFactors]]]:
    modules: dict[str, list[tuple[float, LoraFactors]]] = {}
    for adapter, weight in zip(adapters, weights):
        if any(factors.bias is not None for factors in adapter.loras.values()):
            raise LongctxError(f"{adapter.path} has LoRA biases (lora_bias: true), which --combine does not support; merge it into the model instead")
        for module, factors in adapter.loras.items():
            modules.setdefault(module, []).append((weight, factors))
    for module, entries in modules.items():
        first = entries[0][1]
        for _, factors in entries[1:]:
            if (factors.delta_shape(), factors.embedding, factors.fan_in_fan_out) != (first.delta_shape(), first.embedding, first.fan_in_fan_out):
                raise LongctxError(
                    f"adapters disagree on module {module} (shape {first.delta_shape()} vs {factors.delta_shape()}); "
                    "they were trained on different models and cannot be combined"
                )
    return modules


def combine_adapters(
    adapter_paths: list[str | Path],
    output_dir: str | Path,
    *,
    method: str = "cat",
    weights: list[float] | None = None,
    svd_rank: int | None = None,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
    overwrite: bool = False,
    allow_pickle: bool = False,
    keep_base_config: bool = False,
    progress: bool = True,
) -> CombineResult:
    """Write one PEFT LoRA adapter combining the given ones (see the module docstring)."""
    from tqdm import tqdm

    if method not in COMBINE_METHODS:
        raise LongctxError(f"unknown --combine method {method!r}; use one of {', '.join(COMBINE_METHODS)}")
    if not 0 < density <= 1:
        raise LongctxError(f"--density {density} is out of range; give a fraction in (0, 1]")
    if majority_sign not in ("total", "frequency"):
        raise LongctxError(f"--majority-sign {majority_sign!r} is unknown; use total or frequency")
    if svd_rank is not None and svd_rank < 1:
        raise LongctxError(f"--svd-rank {svd_rank} must be a positive rank")
    check_output_free(output_dir, overwrite, inputs=adapter_inputs(adapter_paths))
    adapters = load_adapters(adapter_paths, allow_pickle=allow_pickle)
    weights = check_weights(weights, len(adapters))
    modules = _entries_by_module(adapters, weights)
    rope, warnings = adapter_rope_settings(adapters)
    warnings = warn_saved_twice(adapters) + warnings
    for warning in warnings:
        log.warning("warning: %s", warning)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    embeddings: set[str] = set()
    default_rank = svd_rank or max(factors.rank for entries in modules.values() for _, factors in entries)
    for module, entries in tqdm(modules.items(), desc=f"combining ({method})", unit="module", disable=not progress):
        if method in ("cat", "linear"):
            A, B = stack_factors(entries)
        else:
            deltas = [factors.scaling * (factors.B.float() @ factors.A.float()) for _, factors in entries]
            generator = torch.Generator().manual_seed(module_seed(seed, module))
            combined = combine_deltas(deltas, [w for w, _ in entries], method, density=density, majority_sign=majority_sign, generator=generator)
            A, B = low_rank(combined, default_rank)
        embedding = entries[0][1].embedding
        if embedding:
            embeddings.add(module)
        tensors[lora_key(module, "A", embedding=embedding)] = A
        tensors[lora_key(module, "B", embedding=embedding)] = B
        ranks[module] = A.shape[0]

    saved: dict[str, torch.Tensor] = {}
    base_layers: dict[str, torch.Tensor] = {}
    for adapter in adapters:  # later adapters win, as in the merge
        saved.update(adapter.saved_modules)
        base_layers.update(adapter.base_layer_tensors)
    for name, tensor in saved.items():
        tensors[full_module_key(*name.rsplit(".", 1))] = tensor
    for name, tensor in base_layers.items():
        tensors[base_layer_key(name)] = tensor

    config = combined_config(adapters, ranks, sorted({name.rsplit(".", 1)[0] for name in saved}))
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp, tensors, file_name=ADAPTER_WEIGHTS, max_shard_bytes=None)
        write_json(tmp / ADAPTER_CONFIG, config)
        if rope is not None and not keep_base_config:
            write_metadata(
                tmp,
                "lora-adapter",
                rope_parameters=rope.rope_parameters,
                max_position_embeddings=rope.max_position_embeddings,
                combined_from=[{"path": str(a.path), "weight": w} for a, w in zip(adapters, weights)],
                combine_method=method,
            )
    return CombineResult(
        output_dir=Path(output_dir),
        method=method,
        adapters=[str(adapter.path) for adapter in adapters],
        weights=weights,
        modules=len(modules),
        ranks=sorted(set(ranks.values())),
        modules_to_save=sorted({name.rsplit(".", 1)[0] for name in saved}),
        rope=None if keep_base_config else rope,
        warnings=warnings,
    )


def combined_config(adapters: list[Adapter], ranks: dict[str, int], modules_to_save: list[str]) -> dict:
    """The first adapter's config file with scaling 1 everywhere (rank_fields) and exactly the combined modules targeted."""
    config = read_adapter_config(adapters[0].path)
    config.update(
        **rank_fields(ranks),
        use_rslora=False,
        target_modules=sorted(ranks),
        modules_to_save=modules_to_save or None,
        layers_to_transform=None,
        layers_pattern=None,
        init_lora_weights=True,
    )
    config.pop("exclude_modules", None)
    return config
