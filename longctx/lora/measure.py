"""The error of any LoRA adapter (ours, mergekit's) against the model pair it was extracted from."""

from __future__ import annotations

from pathlib import Path

from longctx.errors import LongctxError
from longctx.lora.adapter import module_scaling, read_lora_config
from longctx.lora.adapter_format import ADAPTER_WEIGHTS, KEY_PREFIX, lora_key, split_lora_key
from longctx.lora.lowrank import frobenius_sq, residual_stats
from longctx.lora.threads import cpu_threads
from longctx.models import TensorReader, resolve_model


def measure_adapter(base_dir: str | Path, extended_dir: str | Path, adapter_dir: str | Path, *, allow_pickle: bool = False,
                    show_progress: bool = False) -> list[dict]:
    """Per LoRA module of an adapter: rank and measured ||dW - scaling * B A|| / ||dW||."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    adapter_dir = Path(adapter_dir)
    config = read_lora_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LongctxError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    entries = []
    with safe_open(weights, framework="pt") as adapter, \
            TensorReader(resolve_model(base_dir), allow_pickle=allow_pickle) as base, \
            TensorReader(resolve_model(extended_dir), allow_pickle=allow_pickle) as extended:
        factors = {}  # module -> (A key, B key, of an embedding)
        for key in adapter.keys():
            part = split_lora_key(key.removeprefix(KEY_PREFIX))
            if part is not None and part[1] == "A":
                module, _, is_embedding = part
                factors[module] = (key, lora_key(module, "B", embedding=is_embedding), is_embedding)
        for module, (a_key, b_key, is_embedding) in tqdm(sorted(factors.items()), desc="measure", disable=not show_progress):
            name = f"{module}.weight"
            delta = extended.get(name).float() - base.get(name).float()
            if is_embedding:
                delta = delta.T
            a = adapter.get_tensor(a_key).float()
            b = adapter.get_tensor(b_key).float() * module_scaling(config, module)
            with cpu_threads(1):
                total = frobenius_sq(delta)
                stats = residual_stats(delta, a, b, total_energy=total) if total > 0 else None
            entries.append({
                "module": module,
                "kind": "lora_embedding" if is_embedding else "lora",
                "shape": list(delta.T.shape if is_embedding else delta.shape),
                "rank": a.shape[0],
                "retained_energy": round(stats.retained_energy, 8) if stats else None,
                "relative_error": stats.relative_error if stats else None,
            })
    for module in config.modules_to_save or []:
        entries.append({"module": module, "kind": "modules_to_save"})
    return entries
