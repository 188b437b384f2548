"""Write model and adapter directories atomically, and the small files beside the weights.

Every command that writes a directory does it through `atomic_output_dir`: the work
goes into a hidden temporary directory beside the destination, which is renamed into
place only when everything succeeded. A failure leaves nothing behind, and an existing
destination is replaced only with overwrite=True. The weights themselves are written by
longctx.models.writer. Nothing here imports torch, so `longctx --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from longctx.errors import LongctxError

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
