"""`extract-lora --engine mergekit`: mergekit-extract-lora on the same inputs, in a subprocess,
with what it lacks added: the rope sidecar (longctx.json) and our measured report."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from longctx.errors import LongctxError
from longctx.lora.adapter_format import ADAPTER_WEIGHTS
from longctx.lora.extract import REPORT_FILE, ExtractionSettings, model_inputs, summarize, write_sidecar
from longctx.lora.measure import measure_adapter
from longctx.models import atomic_output_dir, check_output_free, read_json, resolve_model, write_json
from longctx.rope.config import rope_settings

# The settings mergekit-extract-lora has a flag for; any other must keep its default.
MERGEKIT_SETTINGS = ("rank", "energy", "max_rank", "target_modules", "embeddings", "device")


def mergekit_command() -> list[str]:
    import shutil

    beside_python = Path(sys.executable).parent / "mergekit-extract-lora"
    found = str(beside_python) if beside_python.is_file() else shutil.which("mergekit-extract-lora")
    if not found:
        raise LongctxError(
            "mergekit-extract-lora was not found; install mergekit (`pip install mergekit`) or use --engine longctx"
        )
    return [found]


def check_supported(settings: ExtractionSettings) -> None:
    if settings.energy is not None or settings.max_rank is not None:
        raise LongctxError(
            "--engine mergekit supports a fixed --rank only (mergekit has no energy-based rank); drop --energy/--max-rank"
        )
    defaults = ExtractionSettings()
    given = [field.name for field in dataclasses.fields(settings)
             if field.name not in MERGEKIT_SETTINGS and getattr(settings, field.name) != getattr(defaults, field.name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise LongctxError(f"--engine mergekit does not support {flags}; use --engine longctx")


def extract_lora_with_mergekit(base_dir: str | Path, extended_dir: str | Path, output_dir: str | Path, *,
                               overwrite: bool = False, show_progress: bool = True, **settings) -> dict:
    """Run mergekit-extract-lora on the same inputs, then add the rope sidecar and our report.
    settings: the fields of ExtractionSettings that mergekit supports (MERGEKIT_SETTINGS)."""
    settings = ExtractionSettings(**settings)
    check_supported(settings)
    settings.validate()
    output_dir = check_output_free(output_dir, overwrite, inputs=model_inputs(base_dir, extended_dir))
    base_dir, extended_dir = resolve_model(base_dir), resolve_model(extended_dir)
    rope = rope_settings(read_json(extended_dir / "config.json"))
    command = mergekit_command() + ["--model", str(extended_dir), "--base-model", str(base_dir), "--max-rank", str(settings.rank)]
    if settings.embeddings == "lora":
        command.append("--embed-lora")
    elif settings.embeddings == "skip":
        command += ["--exclude-regex", r"embed_tokens|lm_head"]
    for target in settings.target_modules or []:
        command += ["--include-regex", rf"(^|\.){target}$"]
    command += ["--cuda"] if settings.device.startswith("cuda") else ["--no-cuda"]
    if not show_progress:
        command.append("--quiet")
    started = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        result = subprocess.run(command + ["--out-path", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise LongctxError(f"mergekit-extract-lora failed (exit {result.returncode}): {last}")
        seconds = time.perf_counter() - started
        modules = measure_adapter(base_dir, extended_dir, tmp, show_progress=show_progress)
        errors = [m["relative_error"] for m in modules if m.get("relative_error") is not None]
        report = {
            "engine": "mergekit",
            "command": command,
            "base_model": str(base_dir),
            "extended_model": str(extended_dir),
            "settings": {"rank": settings.rank, "embeddings": settings.embeddings, "target_modules": settings.target_modules,
                         "device": settings.device},
            "summary": summarize(modules, (tmp / ADAPTER_WEIGHTS).stat().st_size, seconds, errors),
            "modules": modules,
        }
        write_json(tmp / REPORT_FILE, report)
        write_sidecar(tmp, base_dir, extended_dir, rope, engine="mergekit")
    report["output"] = str(output_dir)
    return report
