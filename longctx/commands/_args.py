"""Argument types and flags shared by several commands."""

from __future__ import annotations

import argparse

from longctx.models.reference import DEFAULT_MODEL
from longctx.units import parse_byte_count, parse_token_count


def token_count(text: str) -> int:
    """argparse type wrapper of parse_token_count."""
    try:
        return parse_token_count(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def byte_count(text: str) -> int:
    """argparse type wrapper of parse_byte_count: 80GiB, 500MB, 1024."""
    try:
        return parse_byte_count(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def token_count_list(text: str) -> list[int]:
    """'1k,2k,4k' -> [1024, 2048, 4096]."""
    return [token_count(part) for part in text.split(",") if part.strip()]


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_model_argument(parser: argparse.ArgumentParser, flag: str = "--model") -> None:
    parser.add_argument(
        flag,
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"model directory, .gguf file, hub id, or {DEFAULT_MODEL} (the embedded default; default: %(default)s)",
    )


def add_output_arguments(parser: argparse.ArgumentParser, *, flag: str = "--output", required: bool = True) -> None:
    parser.add_argument(flag, required=required, metavar="DIR", help="directory to write (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")


def add_allow_pickle_argument(parser) -> None:
    """--allow-pickle, as every command that reads weights takes it (the refusal is TensorReader's)."""
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle weights (pytorch_model*.bin, adapter_model.bin), which can run code when "
                        "loaded: only for files you trust")


def formatter(prog: str) -> argparse.HelpFormatter:
    """Keeps the examples in epilogs as written and shows defaults."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)
