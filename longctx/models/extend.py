"""Write an extended model directory: new rope settings in the config, the weights linked.

The disk side of `longctx extend`: longctx.rope decides the settings (and touches no file),
this module writes them. Extending changes config files only: config.json gets the new
rope_parameters and max_position_embeddings, tokenizer_config.json the new model_max_length,
longctx.json records what was done, and the weight shards are hard-linked (copied when the
output is on another filesystem), so extending an 8B model takes seconds and a few MB of memory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from longctx.errors import LongctxError
from longctx.models.metadata import write_metadata
from longctx.models.output import (
    atomic_output_dir, check_output_free, copy_auxiliary_files, existing_ancestor, link_or_copy, read_json,
    set_model_max_length, write_json,
)
from longctx.models.tensors import PICKLE_INDEX, SAFE_INDEX, TensorReader
from longctx.rope.config import apply_rope_settings, context_length, native_length, rope_settings
from longctx.rope.planner import rope_for_length
from longctx.rope.methods import LENGTH_DEPENDENT_TYPES
from longctx.rope.self_extend import CONFIG_KEY as SELF_EXTEND_KEY, SELF_EXTEND, self_extend_for_length

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# rope_parameters keys that describe the model rather than the method
NOT_METHOD_PARAMETERS = ("rope_type", "original_max_position_embeddings", "partial_rotary_factor")


@dataclasses.dataclass
class ExtendResult:
    output: Path
    source: dict  # rope settings before
    settings: dict  # rope settings written
    native_len: int
    target_len: int
    weight_files: list[str]
    linked: int
    copied: int
    weight_bytes: int
    carried: list[str]  # tokenizer and generation files
    metadata: dict
    self_extend: dict | None = None  # {"group_size", "window"} written to the config, if any


def check_weights(model_dir: Path, *, allow_pickle: bool = False) -> list[str]:
    """The weight files of model_dir (shards, then the index), after checking they are all there and readable.

    Safetensors headers are parsed (not the tensors), so a truncated or corrupt shard, or
    an index naming tensors a shard does not hold, fails here, before anything is written.
    """
    reader = TensorReader(model_dir, allow_pickle=allow_pickle)
    reader.verify()
    shards = reader.shards()
    index = PICKLE_INDEX if reader.is_pickle else SAFE_INDEX
    return shards + ([index] if (model_dir / index).is_file() else [])


def extend_model(
    model_dir: str | Path,
    output: str | Path,
    target_len: int,
    method: str,
    *,
    source_model: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    self_extend: dict | None = None,
    **overrides,
) -> ExtendResult:
    """Write `output`: the model in model_dir with rope settings for target_len (see rope_for_length).

    method "self-extend" keeps the rope as it is. `self_extend` asks for grouped-position attention
    (required with method "self-extend", optional beside a static rope method): {"group_size": G,
    "window": W}, either None to let rope/self_extend.py plan it; the result goes into config.json,
    where longctx_self_extend reads it, and into longctx.json."""
    model_dir = Path(model_dir)
    output = Path(output)
    check_output_free(output, overwrite, inputs={"the source model": model_dir})

    config = read_json(model_dir / CONFIG_FILE)
    if not isinstance(config, dict):
        raise LongctxError(f"{model_dir / CONFIG_FILE} is not a JSON object; the file is corrupt")
    source = rope_settings(config)
    current = context_length(source)
    if target_len <= current and not force:
        raise LongctxError(
            f"target length {target_len} is not beyond the model's context length {current}; "
            "choose a longer --target-len, or pass --force to write it anyway"
        )
    native = native_length(source)
    if method == SELF_EXTEND:
        if self_extend is None:
            self_extend = {}
        given = sorted(key for key, value in overrides.items() if value is not None)
        if given:
            raise LongctxError(f"{', '.join('--' + key.replace('_', '-') for key in given)} does not apply to method "
                               "self-extend (it keeps the rope as it is); drop it, or use --method M --self-extend")
        settings = {"rope_parameters": dict(source["rope_parameters"]), "max_position_embeddings": target_len}
    else:
        settings = rope_for_length(config, target_len, method, **overrides)
    if self_extend is not None:
        if settings["rope_parameters"]["rope_type"] in LENGTH_DEPENDENT_TYPES:
            raise LongctxError(f"Self-Extend needs a static rope, but {method} changes the rotation with the length; "
                               "combine --self-extend with ntk, yarn, linear or llama3")
        self_extend = self_extend_for_length(native, target_len, **self_extend)
    weight_files = check_weights(model_dir, allow_pickle=allow_pickle)

    if (model_dir / TOKENIZER_CONFIG_FILE).is_file():
        read_json(model_dir / TOKENIZER_CONFIG_FILE)  # a corrupt one fails before the output is begun

    params = settings["rope_parameters"]
    method_parameters = {key: value for key, value in params.items() if key not in NOT_METHOD_PARAMETERS}
    modes = []
    # the shards are hard-linked, and copied only onto another filesystem: only then do they need room
    copied = os.stat(model_dir).st_dev != os.stat(existing_ancestor(output)).st_dev
    expected = sum((model_dir / name).stat().st_size for name in weight_files) if copied else None
    with atomic_output_dir(output, overwrite=overwrite, expected_bytes=expected) as tmp:
        new_config = apply_rope_settings(config, params, settings["max_position_embeddings"])
        if self_extend is not None:
            new_config[SELF_EXTEND_KEY] = self_extend
        write_json(tmp / CONFIG_FILE, new_config)
        for name in weight_files:
            modes.append(link_or_copy(model_dir / name, tmp / name))
        carried = copy_auxiliary_files(model_dir, tmp)
        set_model_max_length(tmp, target_len)
        metadata = write_metadata(
            tmp,
            "extended-model",
            rope_parameters=params,
            max_position_embeddings=settings["max_position_embeddings"],
            method=method,
            source_model=source_model or str(model_dir),
            source_rope_parameters=source["rope_parameters"],
            source_max_position_embeddings=source["max_position_embeddings"],
            original_max_position_embeddings=native,
            target_len=target_len,
            **({SELF_EXTEND_KEY: self_extend} if self_extend is not None else {}),
            **method_parameters,
        )
    return ExtendResult(
        output=output,
        source=source,
        settings=settings,
        native_len=native,
        target_len=target_len,
        weight_files=weight_files,
        linked=modes.count("link"),
        copied=modes.count("copy"),
        weight_bytes=sum((output / name).stat().st_size for name in weight_files),
        carried=carried,
        metadata=metadata,
        self_extend=self_extend,
    )

