"""Stream tensors from a model directory, one at a time.

Like mergekit's lazy loader: the index maps each tensor name to its shard, a shard is
opened only when one of its tensors is asked for, and only the asked-for tensor is read
into memory. Pickle checkpoints (pytorch_model*.bin) are refused unless allow_pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from longctx.errors import LongctxError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own error types
        raise LongctxError(f"cannot read {path}: {error}; the file is corrupt or truncated") from error


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as error:
        raise LongctxError(f"{index_path} is not a valid weight index ({error}); re-save the model") from error
    return dict(weight_map)


class TensorReader:
    """Read-only, name-addressed access to a model's weights without loading them all.

    `reader.names()` lists tensor names in checkpoint order, `reader.get(name)` reads
    one tensor, `reader.iter_tensors()` yields (name, tensor) shard by shard so at most
    one shard's file handle is open at a time.
    """

    def __init__(self, model_dir: str | Path, *, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise LongctxError(f"model directory {self.model_dir} does not exist")
        self.is_pickle = False
        if (self.model_dir / SAFE_INDEX).is_file():
            self.weight_map = _read_index(self.model_dir / SAFE_INDEX)
        elif (self.model_dir / SAFE_SINGLE).is_file():
            self.weight_map = {name: SAFE_SINGLE for name in _open_safetensors(self.model_dir / SAFE_SINGLE).keys()}
        elif (self.model_dir / PICKLE_INDEX).is_file() or (self.model_dir / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise LongctxError(
                    f"{self.model_dir} holds pickle checkpoints (pytorch_model*.bin), which can run code "
                    "when loaded; pass --allow-pickle if you trust them, or convert them to safetensors"
                )
            self.is_pickle = True
            if (self.model_dir / PICKLE_INDEX).is_file():
                self.weight_map = _read_index(self.model_dir / PICKLE_INDEX)
            else:
                state = self._load_pickle(PICKLE_SINGLE)
                self.weight_map = {name: PICKLE_SINGLE for name in state}
        else:
            raise LongctxError(
                f"no weights in {self.model_dir}: expected model.safetensors or {SAFE_INDEX}"
            )
        missing = sorted({shard for shard in self.weight_map.values() if not (self.model_dir / shard).is_file()})
        if missing:
            raise LongctxError(f"{self.model_dir} is missing weight shard(s) {', '.join(missing)}; re-download or re-save the model")
        self._open_shard: str | None = None
        self._handle = None
        self._pickle_state: dict[str, torch.Tensor] | None = None

    def _load_pickle(self, shard: str) -> dict[str, torch.Tensor]:
        return torch.load(self.model_dir / shard, map_location="cpu", weights_only=True, mmap=True)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shards(self) -> list[str]:
        """Shard file names in order of first appearance."""
        return list(dict.fromkeys(self.weight_map.values()))

    def names_in_shard(self, shard: str) -> list[str]:
        return [name for name, file in self.weight_map.items() if file == shard]

    def verify(self) -> None:
        """Parse every shard's header (not its tensors): a corrupt or truncated shard, or an
        index naming tensors that a shard lacks, fails here with a LongctxError."""
        if self.is_pickle:
            return
        for shard in self.shards():
            present = set(_open_safetensors(self.model_dir / shard).keys())
            missing = [name for name in self.names_in_shard(shard) if name not in present]
            if missing:
                raise LongctxError(
                    f"{self.model_dir / shard} lacks {len(missing)} tensor(s) its index names (e.g. {missing[0]}); "
                    "the model is incomplete, re-download or re-save it"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _shard_handle(self, shard: str):
        if self._open_shard != shard:
            self.close()
            if self.is_pickle:
                self._pickle_state = self._load_pickle(shard)
            else:
                self._handle = _open_safetensors(self.model_dir / shard)
            self._open_shard = shard
        return self._pickle_state if self.is_pickle else self._handle

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise LongctxError(f"tensor {name} is not in {self.model_dir}")
        handle = self._shard_handle(self.weight_map[name])
        if self.is_pickle:
            return handle[name]
        try:
            return handle.get_tensor(name)
        except Exception as error:
            raise LongctxError(f"cannot read tensor {name} from {self.model_dir}: {error}") from error

    def shape(self, name: str) -> tuple[int, ...]:
        if self.is_pickle:
            return tuple(self.get(name).shape)
        handle = self._shard_handle(self.weight_map[name])
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype if self.is_pickle else _SAFE_DTYPES[self._shard_handle(self.weight_map[name]).get_slice(name).get_dtype()]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard in self.shards():
            for name in self.names_in_shard(shard):
                yield name, self.get(name)

    def total_bytes(self) -> int:
        return sum((self.model_dir / shard).stat().st_size for shard in self.shards())

    def close(self) -> None:
        self._handle = None
        self._pickle_state = None
        self._open_shard = None

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
