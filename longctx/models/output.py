"""Write model and adapter directories atomically, and the small files beside the weights.

Every command that writes a directory does it through `atomic_output_dir`: the work
goes into a hidden temporary directory beside the destination, which is renamed into
place only when everything succeeded. A failure leaves nothing behind, and an existing
destination is replaced only with overwrite=True. `check_output_free` is the one place that
decides whether an output may be written (exists, overlaps an input, parent writable, free
space); every command calls it before any work. The weights themselves are written by
longctx.models.writer. Nothing here imports torch, so `longctx --help` stays fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from longctx.errors import LongctxError
from longctx.units import format_bytes

log = logging.getLogger(__name__)

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


def check_output_free(
    dest: str | Path,
    overwrite: bool,
    *,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    expected_bytes: int | None = None,
) -> Path:
    """Decide, before any work, whether dest may be written; raise LongctxError if not.

    dest must not be, contain or lie inside any of `inputs` (a label such as "the model" -> a
    path; None, such as for a hub id, is skipped): --overwrite would delete what
    the command is about to read, and an output inside an input changes it. dest must not exist
    unless overwrite (and then must be a directory); its nearest existing ancestor must be a
    writable directory with expected_bytes free, where known. Temporary directories that a
    killed writer of dest left behind are removed on the way (remove_stale_temporaries).
    """
    dest = Path(dest)
    for label, source in (inputs or {}).items():
        if source is not None:
            check_no_overlap(dest, Path(source), label)
    if dest.exists() and not overwrite:
        raise LongctxError(f"output {dest} already exists; pass --overwrite to replace it or choose another path")
    if dest.exists() and not dest.is_dir():
        raise LongctxError(f"output {dest} exists and is not a directory; remove it or choose another path")
    check_parent_writable(dest, expected_bytes)
    remove_stale_temporaries(dest)
    return dest


def check_no_overlap(dest: Path, source: Path, label: str) -> None:
    """Refuse an output that is, contains or lies inside an input (symlinks resolved; an input
    still to be written, such as the model `extend --train` trains, counts too)."""
    out, inp = Path(os.path.realpath(dest)), Path(os.path.realpath(source))
    if out == inp:
        how = "is"
    elif inp.is_relative_to(out):
        how = "contains"
    elif out.is_relative_to(inp):
        how = "lies inside"
    else:
        return
    raise LongctxError(
        f"output {dest} {how} {label} {source}; writing there could destroy an input, choose another output directory"
    )


def existing_ancestor(dest: str | Path) -> Path:
    """The nearest ancestor of dest that exists (where its directory will be made)."""
    ancestor = Path(os.path.abspath(dest)).parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_parent_writable(dest: Path, expected_bytes: int | None = None) -> None:
    """The nearest existing ancestor of dest must be a writable directory with room for expected_bytes."""
    ancestor = existing_ancestor(dest)
    if not ancestor.is_dir():
        raise LongctxError(f"cannot create output {dest}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LongctxError(f"cannot write output {dest}: {ancestor} is not writable (read-only or no permission); "
                           "choose another path")
    if expected_bytes:
        free = shutil.disk_usage(ancestor).free
        if free < expected_bytes:
            raise LongctxError(
                f"output {dest} needs about {format_bytes(expected_bytes)} but {ancestor} has {format_bytes(free)} "
                "free; free some space or choose another path"
            )


# A temporary directory carries its writer in its name, .NAME.tmp-PID@HOST-XXXXXXXX (and
# .NAME.old-PID@HOST-XXXXXXXX for a replaced output on its way out), so that a later run can
# tell what a killed writer left from the work of a live one.
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>[^/]+)-[^-]+$")


def temporary_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def writer_is_gone(pid: int, host: str) -> bool:
    """Whether the process that made a temporary directory has ended (knowable on its own host only)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(dest: str | Path) -> list[Path]:
    """Remove the temporary directories beside dest whose writer is gone; returns them."""
    dest = Path(os.path.abspath(dest))
    if not dest.parent.is_dir():
        return []
    removed = []
    for path in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*-*")):
        match = TEMPORARY_NAME.match(path.name)
        if match and match["name"] == dest.name and path.is_dir() and writer_is_gone(int(match["pid"]), match["host"]):
            log.warning("removing %s, left by an interrupted run (process %s is gone)", path, match["pid"])
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# errors of a write that are the user's environment, not a bug: reported in one line. The disk's
# own (full, over quota, read-only) are reported so wherever they arise (commands/_run.py): needle's
# results and train's metrics are appended in place, outside atomic_output_dir.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
WRITE_ERRNOS = DISK_ERRNOS | {errno.EACCES, errno.EPERM, errno.ENOTDIR}


def output_error(dest: Path, error: OSError) -> LongctxError:
    where = f" ({error.filename})" if error.filename else ""
    return LongctxError(f"cannot write output {dest}: {error.strerror or error}{where}; free some space, fix the "
                        "permissions or choose another path")


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so that replacing an output
    never leaves a moment without one; False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, *, overwrite: bool = False, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dest` when the block succeeds.

    A filesystem error of the write (disk full, read-only, no permission) becomes a one-line
    LongctxError; the temporary directory is removed in every case.
    """
    dest = check_output_free(dest, overwrite, expected_bytes=expected_bytes).absolute()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(dest, "tmp"), dir=dest.parent))
    except OSError as error:
        raise output_error(dest, error) from error
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
    try:
        yield tmp
        if dest.exists() and exchange_paths(tmp, dest):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old output
        elif dest.exists():  # no atomic exchange here: a kill between the two renames leaves dest missing
            retired = Path(tempfile.mkdtemp(prefix=temporary_prefix(dest, "old"), dir=dest.parent))
            os.replace(dest, retired / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno in WRITE_ERRNOS:
            raise output_error(dest, error) from error
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Write through a new file renamed into place: a file hard-linked from elsewhere is replaced, not changed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def set_model_max_length(model_dir: str | Path, length: int) -> None:
    """Record a changed context length where tokenizers read their truncation length
    (tokenizer_config.json's model_max_length), if the directory has a tokenizer config."""
    path = Path(model_dir) / "tokenizer_config.json"
    if path.is_file():
        config = read_json(path)
        config["model_max_length"] = int(length)
        write_json(path, config)


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
