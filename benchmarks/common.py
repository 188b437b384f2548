"""Measurement helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

GNU_TIME = "/usr/bin/time"


def run_measured(command: list[str], log_path: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one command run in its own process.

    Peak RSS comes from GNU time, which forks the command from its own small process: the
    ru_maxrss that wait4 reports for a direct child of this (large) Python process keeps the
    parent's RSS at fork time across exec, and would inflate small figures. Without GNU time,
    wait4's figure is used. Output goes to log_path when given; a failure raises SystemExit
    with the end of its output.
    """
    measured = [GNU_TIME, "-f", "maxrss_kb=%M", *command] if os.path.exists(GNU_TIME) else command
    started = time.perf_counter()
    process = subprocess.Popen(measured, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.stdout.close()
    if log_path is not None:
        Path(log_path).write_text(output)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:4]} failed (exit {os.waitstatus_to_exitcode(status)}):\n{output[-3000:]}")
    reported = [line for line in output.splitlines() if line.startswith("maxrss_kb=")]
    kilobytes = int(reported[-1].split("=")[1]) if reported else usage.ru_maxrss
    return seconds, kilobytes * 1024


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none when it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
