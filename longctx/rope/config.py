"""Read and write the RoPE settings of a transformers config.json (as a plain dict).

transformers v5 keeps every RoPE setting in `rope_parameters` (rope_type, rope_theta,
factor, original_max_position_embeddings, ...). v4 configs split them between a
`rope_scaling` dict (with `type` or `rope_type`) and a top-level `rope_theta`. We read
both and always write v5.

Settings travel as a small dict, the shape every longctx module uses:
    {"rope_parameters": {...v5...}, "max_position_embeddings": int}
"""

from __future__ import annotations

import copy

from longctx.errors import LongctxError
from longctx.rope.methods import ROPE_METHODS, ROPE_TYPES, TYPES_WITH_ORIGINAL_LENGTH, RopeMethod, compute_rope

DEFAULT_THETA = 10000.0  # transformers' default_theta when a config names none
V4_KEYS = ("rope_scaling", "rope_theta")


def _describe(config: dict) -> str:
    return f"model type {config.get('model_type', 'unknown')!r}"


def _written_rope(config: dict) -> dict | None:
    """The rope settings as the config writes them (a copy): v5 rope_parameters, else v4
    rope_scaling (an empty dict when only rope_theta is given); None for a model without RoPE."""
    v5 = config.get("rope_parameters")
    v4 = config.get("rope_scaling")
    if v5:
        params = copy.deepcopy(v5)
    elif v4 or "rope_theta" in config:
        params = copy.deepcopy(v4) if v4 else {}
    else:
        return None
    if not isinstance(params, dict):
        raise LongctxError(f"rope settings in config.json are {type(params).__name__}, not a dict; the config is corrupt")
    return params


def _per_layer_type(params: dict) -> bool:
    """Whether the settings are one dict per layer type (Gemma 3: sliding_attention, full_attention)."""
    return bool(params) and all(isinstance(value, dict) for value in params.values())


def _take_rope_type(params: dict) -> str:
    """Normalize the v4 `type` key to `rope_type` in place; returns the type ("default" when none)."""
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    else:
        params.pop("type", None)
    return params["rope_type"]


def rope_settings(config: dict) -> dict:
    """{"rope_parameters": v5 dict with rope_type and rope_theta, "max_position_embeddings": int}."""
    params = _written_rope(config)
    if params is None:
        raise LongctxError(
            f"{_describe(config)} has no RoPE settings (no rope_parameters, rope_scaling or rope_theta in config.json); "
            "longctx extends RoPE models such as Llama, Mistral or Qwen"
        )
    if _per_layer_type(params):
        raise LongctxError(
            f"{_describe(config)} uses a different RoPE per layer type ({', '.join(params)}); longctx handles one RoPE per model"
        )
    _take_rope_type(params)
    params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_THETA))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])

    max_position_embeddings = config.get("max_position_embeddings")
    if not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
        raise LongctxError(
            f"config.json has no valid max_position_embeddings (got {max_position_embeddings!r}); the config is incomplete or corrupt"
        )
    if params["rope_type"] in TYPES_WITH_ORIGINAL_LENGTH:
        # Phi-3 keeps the pre-training length at the top level, and transformers lets it win
        if config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return {"rope_parameters": params, "max_position_embeddings": max_position_embeddings}


def rope_types(config: dict) -> set[str]:
    """Every rope_type the model's attention uses: one for most models, one per layer type where the
    settings are keyed by layer type (Gemma 3), none for a model without RoPE. Unlike rope_settings
    this refuses nothing: it answers what a model does, for any model evaluation may load."""
    params = _written_rope(config)
    if params is None:
        return set()
    return {_take_rope_type(one) for one in (params.values() if _per_layer_type(params) else [params])}


def apply_rope_settings(config: dict, rope_parameters: dict, max_position_embeddings: int) -> dict:
    """A new config dict carrying these v5 rope settings, with the v4 keys removed."""
    new = copy.deepcopy(config)
    for key in V4_KEYS:
        new.pop(key, None)
    new["rope_parameters"] = copy.deepcopy(rope_parameters)
    new["max_position_embeddings"] = int(max_position_embeddings)
    original = rope_parameters.get("original_max_position_embeddings")
    if original is not None and "original_max_position_embeddings" in new:
        new["original_max_position_embeddings"] = original  # keep a Phi-3 style top-level copy consistent
    return new


def head_dim(config: dict) -> int:
    """The attention head size: explicit head_dim, else hidden_size / num_attention_heads."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    try:
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise LongctxError(
            "config.json has neither head_dim nor hidden_size and num_attention_heads; the config is incomplete"
        ) from error


def rotary_dim(config: dict, rope_parameters: dict | None = None) -> int:
    """Channels per head that RoPE rotates: head_dim * partial_rotary_factor (transformers rounds down)."""
    params = rope_parameters if rope_parameters is not None else rope_settings(config)["rope_parameters"]
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim(config) * factor)


def _method(params: dict) -> RopeMethod:
    """The table entry of a config's rope_type; a type longctx does not know reads as unscaled
    (rope_for_length and rope_frequencies refuse it)."""
    return ROPE_METHODS[params["rope_type"]] if params["rope_type"] in ROPE_TYPES else ROPE_METHODS["default"]


def native_length(settings: dict) -> int:
    """The pre-training context length the rope settings start from.

    For an unscaled model it is max_position_embeddings; for a scaled one, the length before
    scaling: original_max_position_embeddings where the type keeps it (yarn, llama3, longrope),
    max_position_embeddings where transformers reads it as that length (dynamic), else
    max_position_embeddings / factor (linear).
    """
    params = settings["rope_parameters"]
    method = _method(params)
    if method.keeps_original_length:
        return int(params["original_max_position_embeddings"])
    if method is ROPE_METHODS["default"] or method.max_position_is_native:
        return int(settings["max_position_embeddings"])
    return round(settings["max_position_embeddings"] / params["factor"])  # linear: the scaled length


def context_length(settings: dict) -> int:
    """The context length the settings are meant for (dynamic: original length x factor)."""
    params = settings["rope_parameters"]
    if _method(params).max_position_is_native:
        return round(settings["max_position_embeddings"] * params["factor"])
    return int(settings["max_position_embeddings"])


def rope_frequencies(config: dict, seq_len: int | None = None):
    """(inv_freq, attention_factor) that transformers builds for this config.json dict."""
    settings = rope_settings(config)
    params = settings["rope_parameters"]
    if params["rope_type"] not in ROPE_TYPES:
        raise LongctxError(f"rope_type {params['rope_type']!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return compute_rope(
        params,
        rotary_dim=rotary_dim(config, params),
        max_position_embeddings=settings["max_position_embeddings"],
        seq_len=seq_len,
    )
