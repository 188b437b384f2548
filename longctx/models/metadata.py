"""The longctx metadata file: what was done to a model or adapter, for the next step to read.

`longctx.json` sits beside config.json (model directories written by extend and train)
or beside adapter_config.json (adapters written by extract-lora). Every kind carries the
rope settings at the top level, so any consumer (merge_adapters, train) can apply them:

    {
      "longctx_version": "0.1.0",
      "kind": "extended-model" | "trained-model" | "lora-adapter",
      "rope_parameters": {...},             # transformers v5 rope_parameters
      "max_position_embeddings": 32768,
      ...                                    # kind-specific: method, source model, stages, ...
    }
"""

from __future__ import annotations

from pathlib import Path

from longctx.version import __version__
from longctx.models.output import read_json, write_json

METADATA_FILE = "longctx.json"


def read_metadata(directory: str | Path) -> dict | None:
    """The longctx.json in directory, or None when there is none."""
    path = Path(directory) / METADATA_FILE
    return read_json(path) if path.is_file() else None


def write_metadata(directory: str | Path, kind: str, *, rope_parameters: dict, max_position_embeddings: int, **fields) -> dict:
    data = {
        "longctx_version": __version__,
        "kind": kind,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": int(max_position_embeddings),
        **fields,
    }
    write_json(Path(directory) / METADATA_FILE, data)
    return data
