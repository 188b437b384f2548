"""Models on disk: references, streaming reads, the one safetensors writer, atomic outputs.

What lives where:
  reference  a model reference (directory, .gguf, smollm2-135m, hub id) to a local directory;
             the hub probe (hub_available) and --push_to_hub's upload
  tensors    TensorReader: one tensor at a time from safetensors shards (pickle only if allowed);
             the safetensors dtype table
  writer     SafetensorsWriter, the one safetensors writer (announced layout or open; kernel copies)
  output     atomic_output_dir, check_output_free, JSON and auxiliary-file helpers (no torch)
  metadata   longctx.json, the sidecar that carries rope settings between steps
  layout     a model's module structure from its checkpoint (or a meta-device model)
  dtypes     the dtype names --dtype/--precision accept, and their torch dtypes (no torch import)
  extend     extend_model: an extended model directory (config from rope/, weights hard-linked)
models imports only from the levels below it (errors, units, rope): train, lora and eval build on it.

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
    "resolve_device": "longctx.models.reference",
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
