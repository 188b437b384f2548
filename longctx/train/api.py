"""Entry points for the CLI and other commands: train from a config file, or right after `extend`."""

from __future__ import annotations

from pathlib import Path

from longctx.errors import LongctxError
from longctx.train.config import TrainConfig, load_config
from longctx.train.loop import RunPaths, check_run, run_training


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
    allow_pickle: bool = False,
) -> Path | None:
    """Train per the YAML config (model and output overridable); returns the final model directory."""
    config = load_config(config_path, model=model, output=str(output) if output else None)
    paths = run_paths(config)
    return run_training(config, paths, resume=resume, overwrite=overwrite, progress=progress,
                        stop_after_steps=stop_after_steps, inputs={"the training config": Path(config_path)},
                        allow_pickle=allow_pickle)


def prepare_after_extend(extended_dir: Path, config_path: Path, overwrite: bool = False) -> tuple[TrainConfig, RunPaths]:
    """`longctx extend ... --train FILE`, before extend writes anything: the run, checked (check_run).

    The config's `model` is replaced by extended_dir; the output is the config's output, or
    `<extended_dir>-trained` when it names none.
    """
    config = load_config(config_path, model=str(extended_dir))
    if not config.output:
        config.output = str(Path(extended_dir).with_name(Path(extended_dir).name + "-trained"))
    paths = run_paths(config)
    check_run(config, paths, overwrite=overwrite,
              inputs={"the training config": Path(config_path), "the extended model": Path(extended_dir)})
    return config, paths


def train_after_extend(extended_dir: Path, config_path: Path, overwrite: bool = False) -> Path:
    """Train the extended model per the config (what `extend --train` runs once the model is written)."""
    return run_training(*prepare_after_extend(extended_dir, config_path, overwrite), overwrite=overwrite)
