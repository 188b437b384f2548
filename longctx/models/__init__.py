"""Model references, streaming tensor reads, and atomic save_pretrained-style writes.

Names are imported on first use (PEP 562) so that importing a light helper from here,
as the CLI's argument definitions do, does not import torch.
"""

import importlib

_EXPORTS = {
    "atomic_output_dir": "longctx.models.output",
    "check_output_free": "longctx.models.output",
    "copy_auxiliary_files": "longctx.models.output",
    "link_or_copy": "longctx.models.output",
    "read_json": "longctx.models.output",
    "write_json": "longctx.models.output",
    "DEFAULT_MODEL": "longctx.models.reference",
    "load_model_and_tokenizer": "longctx.models.reference",
    "resolve_model": "longctx.models.reference",
    "TensorReader": "longctx.models.tensors",
    "SafetensorsWriter": "longctx.models.writer",
    "tensor_layout": "longctx.models.writer",
    "write_safetensors": "longctx.models.writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longctx.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
