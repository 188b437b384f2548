"""Model references, streaming tensor reads, and atomic save_pretrained-style writes."""

from longctx.models.output import (
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_output_free,
    copy_auxiliary_files,
    link_or_copy,
    read_json,
    write_json,
)
from longctx.models.reference import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model
from longctx.models.tensors import TensorReader

__all__ = [
    "DEFAULT_MODEL",
    "ShardedSafetensorsWriter",
    "TensorReader",
    "atomic_output_dir",
    "check_output_free",
    "copy_auxiliary_files",
    "link_or_copy",
    "load_model_and_tokenizer",
    "read_json",
    "resolve_model",
    "write_json",
]
