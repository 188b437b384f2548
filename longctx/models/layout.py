"""A model's module structure without its weights: which tensor is which module's parameter,
and which modules are linear layers, the input embedding, lm_head, or something else.

Read from the checkpoint's tensor names and shapes for the plain decoder families (no
modeling code imported), else from a meta-device instance built by transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.errors import LongctxError


@dataclass
class ModelLayout:
    """Which tensor belongs to which module of an architecture, and what kind of module it is."""

    module_kind: dict[str, str]  # module name -> "linear" | "embedding" | "lm_head" | "other"
    param_module: dict[str, tuple[str, str]]  # tensor name -> (module name, parameter name)
    module_params: dict[str, list[str]]  # module name -> its parameter names
    all_modules: list[str]
    tied_embeddings: bool
    embedding_module: str | None
    lm_head_module: str | None

    def optional_tensors(self) -> set[str]:
        """lm_head.weight of a tied model is the embedding: some checkpoints store it, some do not."""
        return {f"{self.lm_head_module}.weight"} if self.tied_embeddings and self.lm_head_module else set()


# Decoder families whose CausalLM is embed_tokens, then layers of nn.Linear projections and
# 1-D norms, then lm_head: their layout can be read from the checkpoint's names and shapes,
# which spares importing transformers' modeling code, a large part of a small model's run.
CHECKPOINT_LAYOUT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
EMBEDDING_MODULE, LM_HEAD_MODULE = "model.embed_tokens", "lm_head"


def model_layout(model_dir: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> ModelLayout:
    """The layout from the checkpoint where the architecture allows, else from transformers."""
    return layout_from_checkpoint(config, shapes) or layout_from_transformers(model_dir)


def layout_from_checkpoint(config: dict, shapes: dict[str, tuple[int, ...]]) -> ModelLayout | None:
    """Module kinds from tensor names and shapes, for CHECKPOINT_LAYOUT_ARCHITECTURES only:
    a module with a 2-D weight is a linear layer, one with a 1-D weight a norm. None when
    the config or a tensor does not fit that pattern (the caller then asks transformers)."""
    model_type = config.get("model_type")
    expected = CHECKPOINT_LAYOUT_ARCHITECTURES.get(model_type)
    if expected is None or "text_config" in config or config.get("architectures", [expected]) != [expected]:
        return None
    module_params: dict[str, list[str]] = {}
    weight_dims: dict[str, int] = {}
    for name, shape in shapes.items():
        module, _, param = name.rpartition(".")
        if param not in ("weight", "bias") or not (module.startswith("model.") or module == LM_HEAD_MODULE) or len(shape) > 2:
            return None
        module_params.setdefault(module, []).append(param)
        if param == "weight":
            weight_dims[module] = len(shape)
    module_params.setdefault(LM_HEAD_MODULE, ["weight"])  # a tied checkpoint may not store it
    weight_dims.setdefault(LM_HEAD_MODULE, 2)
    if weight_dims.get(EMBEDDING_MODULE) != 2 or weight_dims[LM_HEAD_MODULE] != 2:
        return None
    module_kind = {}
    for module in module_params:
        if module == EMBEDDING_MODULE:
            module_kind[module] = "embedding"
        elif module == LM_HEAD_MODULE:
            module_kind[module] = "lm_head"
        else:
            module_kind[module] = "linear" if weight_dims.get(module) == 2 else "other"
    param_module = {f"{module}.{param}": (module, param) for module, params in module_params.items() for param in params}
    parents = {module.rsplit(".", i)[0] for module in module_params for i in range(module.count(".") + 1)}
    return ModelLayout(
        module_kind=module_kind,
        param_module=param_module,
        module_params=module_params,
        all_modules=sorted(parents),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        embedding_module=EMBEDDING_MODULE,
        lm_head_module=LM_HEAD_MODULE,
    )


def layout_from_transformers(model_dir: Path) -> ModelLayout:
    """Module kinds of any architecture transformers knows, from a meta-device instance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as error:
        raise LongctxError(f"cannot build the architecture of {model_dir} with transformers: {error}") from error
    embedding = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    module_kind, param_module, module_params = {}, {}, {}
    embedding_name = lm_head_name = None
    for name, module in model.named_modules():
        params = list(module._parameters)
        if not name or not params:
            continue
        if module is embedding:
            kind, embedding_name = "embedding", name
        elif module is lm_head:
            kind, lm_head_name = "lm_head", name
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        else:
            kind = "other"
        module_kind[name] = kind
        module_params[name] = params
        for param in params:
            param_module[f"{name}.{param}"] = (name, param)
    all_modules = [name for name, _ in model.named_modules() if name]
    return ModelLayout(module_kind, param_module, module_params, all_modules, tied, embedding_name, lm_head_name)
