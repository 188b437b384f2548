"""Running a parsed command line: the one place that turns a LongctxError into a one-line error
(exit 2), shared by the `longctx` entry point and the `merge_adapters` console script."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from longctx.errors import LongctxError
from longctx.models.output import DISK_ERRNOS


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse argv, run the chosen command, and turn LongctxError into a one-line error."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(message)s",
    )
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LongctxError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"{parser.prog}: error: {error.strerror or error}{where}; free some space or write elsewhere, then "
              "rerun (with --resume where the command has it)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def process_exit_code(code: int) -> int:
    """The exit code of a process about to end, after freezing every live object out of the
    interpreter's final garbage collection: walking the objects that importing torch creates
    takes a noticeable share of a small run's time at exit. Console scripts only: in a process
    that goes on (tests), frozen objects would never be collected."""
    gc.freeze()
    return code
