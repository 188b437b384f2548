"""Argument types and flags shared by several commands."""

from __future__ import annotations

import argparse
import re

from longctx.models.reference import DEFAULT_MODEL

_TOKEN_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_token_count(text: str) -> int:
    """'1048576', '1M', '1m', '128k', '128K' -> a token count (k = 1024, M = 1024**2)."""
    match = _TOKEN_COUNT.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a length; write e.g. 32768, 32k or 1M")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = number * {"": 1, "k": 1024, "m": 1024**2}[unit]
    if value != int(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


def token_count(text: str) -> int:
    """argparse type wrapper of parse_token_count."""
    try:
        return parse_token_count(text)
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


def formatter(prog: str) -> argparse.HelpFormatter:
    """Keeps the examples in epilogs as written and shows defaults."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)
