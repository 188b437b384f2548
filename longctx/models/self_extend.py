"""`longctx_self_extend`: grouped-position attention (attention/self_extend.py) as a transformers attention implementation.

A model asks for it with a `self_extend` entry in its config.json, {"group_size": G, "window": W},
which `longctx extend --method self-extend` (or `--self-extend` beside a rope method) writes and
records in longctx.json. `import longctx` registers the implementation with transformers, so a
user's own code needs two lines:

    import longctx
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="longctx_self_extend")

longctx's own loaders (needle, ppl, train) pick it from the config by themselves
(`attention_implementation`). The rotation the groups need is the model's own static inv_freq
(rope/config.py's rope_frequencies, which the tests hold to transformers'); length-dependent
rope (dynamic, longrope) is refused: its rotation changes with the pass, grouping on top of it
has no fixed meaning.
"""

from __future__ import annotations

import torch

from longctx.attention.self_extend import GroupedRotation, self_extend_attention
from longctx.errors import LongctxError
from longctx.rope.config import rope_frequencies, rope_types
from longctx.rope.methods import LENGTH_DEPENDENT_TYPES
from longctx.rope.self_extend import CONFIG_KEY

ATTENTION_NAME = "longctx_self_extend"


def self_extend_settings(config) -> dict | None:
    """{"group_size": G, "window": W} of a transformers config or config.json dict, or None."""
    settings = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if settings is None:
        return None
    try:
        group_size, window = int(settings["group_size"]), int(settings["window"])
    except (TypeError, KeyError, ValueError) as error:
        raise LongctxError(
            f"config {CONFIG_KEY} is {settings!r}; it must be {{\"group_size\": G, \"window\": W}} with whole numbers"
        ) from error
    if group_size < 1 or window < 1:
        raise LongctxError(f"config {CONFIG_KEY}: group_size and window must be at least 1, got {group_size}, {window}")
    return {"group_size": group_size, "window": window}


def attention_implementation(config: dict) -> str | None:
    """ATTENTION_NAME when a config.json dict asks for grouped-position attention, else None."""
    return ATTENTION_NAME if self_extend_settings(config) is not None else None


def _rotation(module, settings: dict) -> GroupedRotation:
    """The grouped-position tables of an attention module, built once from the model's static inv_freq."""
    rotation = getattr(module, "_longctx_grouped_rotation", None)
    if rotation is None or (rotation.group_size, rotation.window) != (settings["group_size"], settings["window"]):
        config = module.config.to_dict()
        dependent = rope_types(config) & set(LENGTH_DEPENDENT_TYPES)
        if dependent:
            raise LongctxError(
                f"{ATTENTION_NAME} needs a static rope type, but the model uses {', '.join(sorted(dependent))}; "
                "extend with ntk or yarn for Self-Extend"
            )
        rotation = GroupedRotation(rope_frequencies(config)[0], settings["group_size"], settings["window"])
        module._longctx_grouped_rotation = rotation
    return rotation


def self_extend_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    settings = self_extend_settings(module.config)
    if settings is None:
        raise LongctxError(
            f"attn_implementation={ATTENTION_NAME!r} needs a {CONFIG_KEY} entry in the model config; "
            "write one with `longctx extend --method self-extend`"
        )
    if attention_mask is not None:
        raise LongctxError(f"{ATTENTION_NAME} takes no attention mask (no padding, no packed documents); run one sequence at a time")
    if dropout:
        raise LongctxError(f"{ATTENTION_NAME} has no attention dropout; set the model's attention_dropout to 0")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise LongctxError(f"{ATTENTION_NAME} supports neither sliding-window attention nor logit softcapping")
    position_ids = kwargs.get("position_ids")
    start = key.shape[2] - query.shape[2]
    if position_ids is not None and (int(position_ids.min()) != start or int(position_ids.max()) != key.shape[2] - 1):
        raise LongctxError(
            f"{ATTENTION_NAME} expects the queries to be the last positions of the sequence (positions {start}.."
            f"{key.shape[2] - 1}); packed documents and left padding are not supported"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = self_extend_attention(query, key, value, rotation=_rotation(module, settings), scale=scale)
    return out.transpose(1, 2).contiguous(), None


def self_extend_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """No mask: causality is the attention's own. A padding mask (any 0) is refused, not dropped."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise LongctxError(f"{ATTENTION_NAME} takes no padding attention_mask; run one unpadded sequence at a time")
    return None


def register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, self_extend_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, self_extend_mask)
