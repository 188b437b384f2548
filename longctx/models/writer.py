"""The one safetensors writer: save_pretrained-style files written one tensor at a time.

Every safetensors file longctx writes goes through `SafetensorsWriter`: merged models,
extracted and combined adapters, models converted from GGUF, trained models (a training run's
resumable states are torch.distributed.checkpoint's, train/checkpoint.py). The output is
what save_pretrained writes: one `model.safetensors`, or shards
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`; a shard is closed
before a tensor would take it past max_shard_bytes. Each file has the standard layout: the
header's length (8 bytes, little-endian), the JSON header padded with spaces to 8 bytes,
then the tensors' bytes in the header's order.

A writer holds no tensor after writing it, and is fed in one of two ways:
- announced: every tensor's name, shape and dtype are given up front, in order (from a
  checkpoint's headers, a merge plan, a meta-device state dict: `tensor_layout`). Each
  shard's header is written when the shard opens and each tensor's bytes go straight to
  their place. Tensors must come in the announced order.
- open (layout=None): tensors come in any order, their shapes known only once computed
  (an extracted adapter's ranks). Each shard's bytes go to a side file as they come, and
  `close()` writes the header and moves the bytes behind it in the kernel.
Either way `copy()` appends a tensor unchanged from another safetensors file, file to file
in the kernel (copy_file_range), without passing through our memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from longctx.errors import LongctxError
from longctx.models.output import write_json
from longctx.models.tensors import SAFETENSORS_DTYPE_NAMES, TensorLocation

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
COPY_BLOCK = 64 * 1024**2

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype), in file order


def tensor_layout(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """The layout of a state dict, in its order; meta-device tensors will do (no data is read)."""
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def write_safetensors(out_dir: str | Path, tensors: Mapping[str, torch.Tensor], *, file_name: str = "model.safetensors",
                      max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None) -> list[str]:
    """Write an in-memory state dict as save_pretrained-style shards; returns the file names."""
    with SafetensorsWriter(out_dir, tensor_layout(tensors), file_name=file_name, max_shard_bytes=max_shard_bytes,
                           metadata=metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.files


class _Shard:
    """The header entries of one file; offsets count from the first data byte."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}
        self.nbytes = 0

    def fits(self, size: int, max_bytes: int | None) -> bool:
        return not self.entries or max_bytes is None or self.nbytes + size <= max_bytes

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if dtype not in SAFETENSORS_DTYPE_NAMES:
            raise ValueError(f"safetensors cannot store dtype {dtype} (tensor {name})")
        size = tensor_nbytes(shape, dtype)
        self.entries[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                              "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def header(self, metadata: dict[str, str]) -> bytes:
        encoded = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        return struct.pack("<Q", len(encoded)) + encoded


def _write_all(file, data) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += file.write(view[done:])


def _copy_range(source_path: Path, offset: int, count: int, destination) -> None:
    """Append count bytes of source_path from offset to the open (unbuffered) destination file."""
    with open(source_path, "rb", buffering=0) as source:
        while count:
            try:
                copied = os.copy_file_range(source.fileno(), destination.fileno(), min(count, COPY_BLOCK), offset)
            except OSError:  # not supported between these files: copy through a buffer
                source.seek(offset)
                block = source.read(min(count, COPY_BLOCK))
                _write_all(destination, block)
                copied = len(block)
            if not copied:
                raise LongctxError(f"{source_path} is truncated; re-save the model")
            offset += copied
            count -= copied


class SafetensorsWriter:
    """Write tensors to `out_dir` as save_pretrained does, one at a time (see the module docstring).

    file_name is the single file's name ("adapter_model.safetensors" for a PEFT adapter);
    shards take its stem. max_shard_bytes=None writes one file however large. Use it as a
    context manager: leaving the block closes the files, an exception leaves none of the side
    files behind (write into a temporary directory, such as atomic_output_dir's, so that a
    failure leaves no half-written output either). `files` names the written files.
    """

    def __init__(self, out_dir: str | Path, layout: Layout | None = None, *, file_name: str = "model.safetensors",
                 max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.file_name = file_name
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.files: list[str] = []
        self.total_bytes = 0
        self._shards: list[_Shard] = []
        self._file = None  # the shard being written: its final file (announced) or its side file (open)
        self._open_index = -1
        self._written: list[str] = []
        self._written_names: set[str] = set()
        self._closed = False
        self._announced = layout is not None
        if self._announced:
            self._order = list(layout)
            self._layout = {name: (tuple(shape), dtype) for name, (shape, dtype) in layout.items()}
            self._shard_starts = {name for name, (shape, dtype) in self._layout.items() if self._place(name, shape, dtype)}
            self._names = self._file_names(len(self._shards))

    def _place(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Add a tensor to the last shard, or to a new one when it would not fit. True for a new shard."""
        opens = not self._shards or not self._shards[-1].fits(tensor_nbytes(shape, dtype), self.max_shard_bytes)
        if opens:
            self._shards.append(_Shard())
        self._shards[-1].add(name, shape, dtype)
        return opens

    def _file_names(self, count: int) -> list[str]:
        if count <= 1:
            return [self.file_name]
        stem = self.file_name.removesuffix(".safetensors")
        return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    def _side_file(self, index: int) -> Path:
        return self.out_dir / f".{self.file_name}.{index}.partial"

    def _start(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Check a tensor against the layout; open the next shard's file when the tensor starts one."""
        if self._closed:
            raise ValueError(f"tensor {name} written after close()")
        if self._announced:
            expected = self._order[len(self._written)] if len(self._written) < len(self._order) else None
            if name != expected or (shape, dtype) != self._layout[name]:
                raise ValueError(f"tensor {name} {shape} {dtype} written out of the announced layout (expected {expected})")
            opens = name in self._shard_starts
        else:
            if name in self._written_names:
                raise ValueError(f"tensor {name} written twice")
            opens = self._place(name, shape, dtype)
        if opens:
            self._open_next_shard()
        self._written.append(name)
        self._written_names.add(name)
        self.total_bytes += tensor_nbytes(shape, dtype)

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._open_index += 1
        if self._announced:
            self._file = open(self.out_dir / self._names[self._open_index], "wb", buffering=0)
            _write_all(self._file, self._shards[self._open_index].header(self.metadata))
        else:
            self._file = open(self._side_file(self._open_index), "wb", buffering=0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; it is copied to the CPU as it is written)."""
        tensor = tensor.detach()
        self._start(name, tuple(tensor.shape), tensor.dtype)
        if tensor.numel():
            _write_all(self._file, tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())

    def copy(self, name: str, source: TensorLocation) -> None:
        """Append a tensor's bytes unchanged from a safetensors file (TensorReader.location)."""
        self._start(name, tuple(source.shape), source.dtype)
        _copy_range(source.path, source.offset, source.nbytes, self._file)

    def names(self) -> list[str]:
        """The tensors written so far, in order."""
        return list(self._written)

    def close(self) -> list[str]:
        """Finish the files (and the index when there are shards); returns their names."""
        if self._closed:
            return self.files
        if self._announced and len(self._written) != len(self._order):
            raise ValueError(f"{len(self._order) - len(self._written)} announced tensors were never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True
        if not self._shards:  # nothing written: one valid file with an empty header
            self._shards.append(_Shard())
        if self._announced and self._written:
            self.files = self._names
        else:
            self.files = self._file_names(len(self._shards))
            for index, (shard, file_name) in enumerate(zip(self._shards, self.files)):
                with open(self.out_dir / file_name, "wb", buffering=0) as out:
                    _write_all(out, shard.header(self.metadata))
                    side = self._side_file(index)
                    if side.exists():
                        _copy_range(side, 0, shard.nbytes, out)
                        side.unlink()
        if len(self.files) > 1:
            weight_map = {name: file for shard, file in zip(self._shards, self.files) for name in shard.entries}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.out_dir / f"{self.file_name}.index.json", index)
        return self.files

    def abort(self) -> None:
        """Close the open file and remove the side files (the caller removes its temporary directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True
        for index in range(len(self._shards)):
            self._side_file(index).unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
