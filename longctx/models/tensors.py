"""Stream tensors from a model directory, one at a time.

Like mergekit's lazy loader: the index maps each tensor name to its shard, and only the
asked-for tensor is brought into memory. Each safetensors tensor is its own private
(copy-on-write) memory map of just its bytes, released with the last tensor that views
it: no copy out of the page cache and no fresh pages to fault in (a plain read costs more
CPU, most of it in the kernel; benchmarks/RESULTS.md, extract-lora), while a streaming pass still holds only
the tensors alive, not the touched pages of a whole shard as a map of the shard would.
Pickle checkpoints (pytorch_model*.bin) are refused unless allow_pickle.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.errors import LongctxError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

SAFETENSORS_DTYPES = {
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
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first data byte in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """The tensors of one safetensors file, from its header alone."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_size))
        locations = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            location = TensorLocation(path, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + header_size + start, end - start)
            if location.offset + location.nbytes > size:
                raise ValueError(f"tensor {name} lies beyond the end of the file")
            locations[name] = location
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise LongctxError(f"cannot read {path}: {error}; the file is corrupt or truncated") from error
    return locations


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as error:
        raise LongctxError(f"{index_path} is not a valid weight index ({error}); re-save the model") from error
    return dict(weight_map)


def map_bytes(path: Path, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """count bytes of a file from offset as a 1-D tensor of dtype over a private memory map.

    Writes to the tensor go to private pages, never to the file; the map lives as long as
    a tensor views it. Bytes not aligned to dtype (a safetensors writer need not align
    them) are copied into an aligned buffer.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < offset + count:
            raise LongctxError(f"{path} is truncated; re-download or re-save the model")
        if count == 0:
            return torch.empty(0, dtype=dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(handle.fileno(), offset + count - start, offset=start, access=mmap.ACCESS_COPY)
    if offset % dtype.itemsize:
        return torch.frombuffer(mapping, dtype=torch.uint8, count=count, offset=offset - start).clone().view(dtype)
    return torch.frombuffer(mapping, dtype=dtype, count=count // dtype.itemsize, offset=offset - start)


class TensorReader:
    """Read-only, name-addressed access to a model's weights without loading them all.

    `names()` lists tensor names in checkpoint order, `get(name)` reads one tensor (or a
    block of its rows), `location(name)` says where its bytes are (for copying a tensor
    file to file), `iter_tensors()` yields (name, tensor) shard by shard.
    """

    def __init__(self, model_dir: str | Path, *, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise LongctxError(f"model directory {self.model_dir} does not exist")
        self.is_pickle = False
        self._headers: dict[str, dict[str, TensorLocation]] = {}
        if (self.model_dir / SAFE_INDEX).is_file():
            self.weight_map = _read_index(self.model_dir / SAFE_INDEX)
        elif (self.model_dir / SAFE_SINGLE).is_file():
            self.weight_map = {name: SAFE_SINGLE for name in self._header(SAFE_SINGLE)}
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
                self.weight_map = {name: PICKLE_SINGLE for name in self._load_pickle(PICKLE_SINGLE)}
        else:
            raise LongctxError(f"no weights in {self.model_dir}: expected model.safetensors or {SAFE_INDEX}")
        missing = sorted({shard for shard in self.weight_map.values() if not (self.model_dir / shard).is_file()})
        if missing:
            raise LongctxError(f"{self.model_dir} is missing weight shard(s) {', '.join(missing)}; re-download or re-save the model")
        self._pickle_shard: str | None = None
        self._pickle_state: dict[str, torch.Tensor] | None = None

    def _load_pickle(self, shard: str) -> dict[str, torch.Tensor]:
        return torch.load(self.model_dir / shard, map_location="cpu", weights_only=True, mmap=True)

    def _header(self, shard: str) -> dict[str, TensorLocation]:
        if shard not in self._headers:
            self._headers[shard] = read_safetensors_header(self.model_dir / shard)
        return self._headers[shard]

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
            missing = [name for name in self.names_in_shard(shard) if name not in self._header(shard)]
            if missing:
                raise LongctxError(
                    f"{self.model_dir / shard} lacks {len(missing)} tensor(s) its index names (e.g. {missing[0]}); "
                    "the model is incomplete, re-download or re-save it"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def location(self, name: str) -> TensorLocation:
        if name not in self.weight_map:
            raise LongctxError(f"tensor {name} is not in {self.model_dir}")
        if self.is_pickle:
            raise ValueError("pickle checkpoints have no tensor locations")
        header = self._header(self.weight_map[name])
        if name not in header:
            raise LongctxError(f"{self.model_dir / self.weight_map[name]} lacks tensor {name}; re-save the model")
        return header[name]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor, or the block of its first-dimension rows that `rows` selects."""
        if self.is_pickle:
            return self._get_pickle(name) if rows is None else self._get_pickle(name)[rows]
        location = self.location(name)
        shape, offset, count = list(location.shape), location.offset, location.nbytes
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * location.dtype.itemsize
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row blocks must be contiguous")
            offset, count, shape[0] = offset + start * row_bytes, max(0, stop - start) * row_bytes, max(0, stop - start)
        return map_bytes(location.path, offset, count, location.dtype).reshape(shape)

    def _get_pickle(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise LongctxError(f"tensor {name} is not in {self.model_dir}")
        shard = self.weight_map[name]
        if self._pickle_shard != shard:
            self._pickle_state, self._pickle_shard = self._load_pickle(shard), shard
        return self._pickle_state[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get_pickle(name).shape) if self.is_pickle else self.location(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._get_pickle(name).dtype if self.is_pickle else self.location(name).dtype

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard in self.shards():
            for name in self.names_in_shard(shard):
                yield name, self.get(name)

    def total_bytes(self) -> int:
        return sum((self.model_dir / shard).stat().st_size for shard in self.shards())

    def close(self) -> None:
        self._pickle_state = None
        self._pickle_shard = None

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
