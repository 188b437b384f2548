"""Token counts and sizes as users write and read them.

Lengths are binary: `32k` is 32768 tokens, `1M` 1048576 (as context windows are quoted), and
`length_label` writes them back the same way. Totals of tokens and bytes are decimal (1.0M
tokens, 1.5 GB), as throughput and file sizes are quoted. The argparse wrappers live in
commands/_args.py; training configs parse their `seq_len: 16k` with the same function.
"""

from __future__ import annotations

import re

_BYTE_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {"": 1, "B": 1, **{f"{p}B": 1000 ** (i + 1) for i, p in enumerate("KMGT")},
               **{f"{p}IB": 1024 ** (i + 1) for i, p in enumerate("KMGT")}}
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


def length_label(length: int) -> str:
    """A context length for a table or an axis: 32768 -> '32K', 1500 -> '1.5k', 300 -> '300'."""
    if length % 1024 == 0:
        return f"{length // 1024}K"
    return f"{length / 1000:.1f}k" if length >= 1000 else str(length)


def format_token_total(count: int) -> str:
    """A total number of tokens: 1400000000 -> '1.4B', 2097152 -> '2.1M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def format_bytes(count: int) -> str:
    """A size on disk: 1500000000 -> '1.5 GB', 512 -> '512 B'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def parse_byte_count(text: str) -> int:
    """'5GB' -> 5e9, '80GiB' -> 80 * 2**30, '500MB', '1024' -> bytes, as transformers reads
    max_shard_size: decimal units for KB/MB/GB/TB, binary for KiB/MiB/GiB/TiB."""
    match = _BYTE_COUNT.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 80GiB")
    value = int(float(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return value
