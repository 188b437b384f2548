"""Write model and adapter directories the way save_pretrained does, atomically.

Every command that writes a directory does it through `atomic_output_dir`: the work
goes into a hidden temporary directory beside the destination, which is renamed into
place only when everything succeeded. A failure leaves nothing behind, and an existing
destination is replaced only with overwrite=True.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from longctx.errors import LongctxError

if TYPE_CHECKING:  # torch is imported where tensors are written, so `longctx --help` stays fast
    import torch

# Files that make a model directory usable besides its weights and config.
AUXILIARY_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def check_output_free(dest: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, when dest exists and overwrite is off."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise LongctxError(f"output {dest} already exists; pass --overwrite to replace it or choose another path")
    if dest.exists() and not dest.is_dir():
        raise LongctxError(f"output {dest} exists and is not a directory; remove it or choose another path")
    return dest


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dest` when the block succeeds."""
    dest = check_output_free(dest, overwrite).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
    try:
        yield tmp
        if dest.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, retired / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise LongctxError(f"{path} not found") from error
    except ValueError as error:
        raise LongctxError(f"{path} is not valid JSON ({error}); the file is corrupt") from error


def link_or_copy(src: str | Path, dst: str | Path) -> str:
    """Hard-link src to dst when both are on one filesystem, copy otherwise. Returns 'link' or 'copy'."""
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def copy_auxiliary_files(src_dir: str | Path, dst_dir: str | Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy tokenizer and generation-config files that exist in src_dir; returns their names."""
    copied = []
    for name in AUXILIARY_FILES:
        if name in skip:
            continue
        source = Path(src_dir) / name
        if source.is_file():
            shutil.copy2(source, Path(dst_dir) / name)
            copied.append(name)
    return copied


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardedSafetensorsWriter:
    """Accumulate tensors and write them as save_pretrained-style shards.

    Tensors are buffered until the shard would exceed max_shard_bytes, then written, so
    memory holds at most about one shard. `close()` renames shards to
    model-0000i-of-0000N.safetensors and writes model.safetensors.index.json (or a single
    model.safetensors when everything fit in one shard), as transformers does.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        file_name = f"shard-{len(self._written):05d}.partial"
        save_file(self._buffer, self.out_dir / file_name, metadata={"format": "pt"})
        self._written.append((file_name, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[str]:
        """Write what is left, name the shards, write the index. Returns the shard file names."""
        self.flush()
        count = len(self._written)
        if count == 1:
            final_names = ["model.safetensors"]
        else:
            final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (temp_name, names), final in zip(self._written, final_names):
            os.replace(self.out_dir / temp_name, self.out_dir / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.out_dir / "model.safetensors.index.json", index)
        return final_names
