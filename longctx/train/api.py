"""Entry points for the CLI and other commands: train from a config file, or right after `extend`."""

from __future__ import annotations

from pathlib import Path

from longctx.errors import LongctxError
from longctx.train.config import TrainConfig, load_config
from longctx.train.loop import RunPaths, run_training


def run_paths(config: TrainConfig, output: str | Path | None = None) -> RunPaths:
    output = output or config.output
    if not output:
        raise LongctxError("no output directory: set 'output' in the config or pass --output DIR")
    output = Path(output)
    checkpoints = Path(config.checkpoint_dir) if config.checkpoint_dir else output.with_name(output.name + "-checkpoints")
    return RunPaths(output=output, checkpoints=checkpoints)


def train_from_config(
    config_path: str | Path,
    *,
    output: str | Path | None = None,
    model: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> Path | None:
    """Train per the YAML config (model and output overridable); returns the final model directory."""
    config = load_config(config_path, model=model, output=str(output) if output else None)
    return run_training(config, run_paths(config), resume=resume, overwrite=overwrite, progress=progress,
                        stop_after_steps=stop_after_steps)


def train_after_extend(extended_dir: Path, config_path: Path, overwrite: bool = False) -> Path:
    """`longctx extend ... --train FILE`: train the just-extended model per the config.

    The config's `model` is replaced by extended_dir; the output is the config's output, or
    `<extended_dir>-trained` when it names none.
    """
    config = load_config(config_path, model=str(extended_dir))
    if not config.output:
        config.output = str(Path(extended_dir).with_name(Path(extended_dir).name + "-trained"))
    return run_training(config, run_paths(config), overwrite=overwrite)
