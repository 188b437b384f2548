"""The training config: plain dataclasses, read from YAML and validated with one-line errors.

    model: smollm2-135m                 # directory, .gguf, hub id or smollm2-135m
    output: out/smollm2-32k
    seed: 0
    mode: full                          # full | lora (LongLoRA: LoRA on attention + embeddings and norms)
    precision: float32                  # float32 | bfloat16 (autocast; master weights stay float32)
    activation_checkpointing: true
    loss_chunk_size: 4096               # tokens per chunk of the chunked cross-entropy; 0 = plain loss
    parallel: {sequence_parallel: 1, ulysses: 1}  # ulysses: all-to-all degree (divides sequence_parallel); data parallel over the remaining ranks
    data: {source: synthetic-passkey}   # or {source: files, paths: [corpus/*.jsonl]}
    stages:
      - seq_len: 16k
        rope: {method: yarn}            # planned; or {theta: 1.0e6}; or {method: linear, factor: 2}
        steps: 200                      # or tokens: 50M
        learning_rate: 2.0e-5
        batch_size: 1
        gradient_accumulation: 8
"""

from __future__ import annotations

import dataclasses
import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.rope.planner import METHODS, OPTIONS
from longctx.tasks.haystacks import DATASET_BUILDERS
from longctx.tasks.retrieval import TASKS
from longctx.units import parse_token_count

MODES = ("full", "lora")
PRECISIONS = ("float32", "bfloat16")
DATA_SOURCES = ("synthetic-passkey", "files", "hub")
LR_SCHEDULES = ("constant", "cosine")
PASSKEY_LOSS = ("all", "answer")


@dataclass
class RopeSpec:
    """How a stage sets rope: a planner method (with optional overrides), or explicit values."""

    method: str | None = None  # a planner method (longctx.rope.planner.METHODS: yarn, ntk, scaling-law, ...)
    theta: float | None = None  # explicit rope_theta
    factor: float | None = None  # explicit scaling factor (needs a method)
    overrides: dict = field(default_factory=dict)  # any further planner keywords


@dataclass
class StageConfig:
    seq_len: int
    rope: RopeSpec
    learning_rate: float
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def tokens_per_step(self, dp_size: int = 1) -> int:
        """Tokens of one optimizer step over all data-parallel replicas."""
        return self.seq_len * self.batch_size * self.gradient_accumulation * dp_size

    def total_steps(self, dp_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / self.tokens_per_step(dp_size)))


@dataclass
class PasskeyConfig:
    loss: str = "all"  # all tokens, or only the answer after the question
    tasks: list[str] = field(default_factory=lambda: ["passkey"])  # `longctx needle --task` names, one drawn per document
    haystack: str = "noise"  # a `longctx needle` haystack: noise, essays, file:PATH, dir:PATH, dataset:NAME


@dataclass
class DataConfig:
    source: str = "synthetic-passkey"
    paths: list[str] = field(default_factory=list)  # files or globs (source: files)
    name: str | None = None  # dataset name (source: hub), loaded only where the hub is reachable
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    shuffle_buffer: int = 0  # streaming shuffle buffer (0 = keep file order)
    add_eos: bool = True
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)


@dataclass
class ParallelConfig:
    sequence_parallel: int = 1
    ulysses: int = 1  # 1: the ring alone; sequence_parallel: Ulysses alone; between: Ulysses groups, ring across them


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])  # LongLoRA's embed,norm


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class LoggingConfig:
    log_every: int = 1
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 1


@dataclass
class TrainConfig:
    model: str
    stages: list[StageConfig]
    output: str | None = None
    checkpoint_dir: str | None = None  # default: <output>-checkpoints
    seed: int = 0
    mode: str = "full"
    precision: str = "float32"
    activation_checkpointing: bool = False
    loss_chunk_size: int = 4096
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- reading and validation -------------------------------------------------------------


def load_config(path: str | Path, **replace) -> TrainConfig:
    """Read and validate a YAML config; `replace` sets top-level keys (e.g. model=, output=)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LongctxError(f"config file {path} not found; pass --config with an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else "syntax error"
        raise LongctxError(f"{path} is not valid YAML ({first}); fix the syntax") from error
    if not isinstance(raw, dict):
        raise LongctxError(f"{path} must hold a mapping of settings (model, stages, ...), not {type(raw).__name__}")
    raw.update({key: value for key, value in replace.items() if value is not None})
    try:
        return parse_config(raw)
    except LongctxError as error:
        raise LongctxError(f"{path}: {error}") from None


def parse_config(raw: dict) -> TrainConfig:
    raw = dict(raw)
    _check_keys(raw, TrainConfig, "config")
    for required in ("model", "stages"):
        if required not in raw:
            raise LongctxError(f"'{required}' is missing; add it at the top level")
    stages_raw = raw.pop("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise LongctxError("'stages' must be a non-empty list of stages (each with seq_len, steps or tokens, learning_rate)")
    config = TrainConfig(
        model=str(raw.pop("model")),
        stages=[parse_stage(stage, f"stages[{i}]") for i, stage in enumerate(stages_raw)],
        data=_parse_data(raw.pop("data", {}) or {}),
        parallel=_parse_simple(raw.pop("parallel", {}) or {}, ParallelConfig, "parallel"),
        lora=_parse_simple(raw.pop("lora", {}) or {}, LoraSettings, "lora"),
        optimizer=_parse_simple(raw.pop("optimizer", {}) or {}, OptimizerConfig, "optimizer"),
        logging=_parse_simple(raw.pop("logging", {}) or {}, LoggingConfig, "logging"),
        **{key: _coerce(value, TrainConfig, key, "config") for key, value in raw.items()},
    )
    _validate(config)
    return config


def parse_stage(raw: Any, where: str) -> StageConfig:
    if not isinstance(raw, dict):
        raise LongctxError(f"{where} must be a mapping with seq_len, steps or tokens, learning_rate")
    raw = dict(raw)
    _check_keys(raw, StageConfig, where)
    for required in ("seq_len", "learning_rate"):
        if required not in raw:
            raise LongctxError(f"{where}.{required} is missing; every stage needs seq_len and learning_rate")
    for key in ("seq_len", "tokens"):
        if key in raw:
            try:
                raw[key] = parse_token_count(raw[key])
            except ValueError as error:
                raise LongctxError(f"{where}.{key}: {error}") from None
    if ("steps" in raw) == ("tokens" in raw):
        raise LongctxError(f"{where}: give exactly one of 'steps' or 'tokens'")
    rope = _parse_rope(raw.pop("rope", None), f"{where}.rope")
    stage = StageConfig(rope=rope, **{key: _coerce(value, StageConfig, key, where) for key, value in raw.items()})
    for key in ("seq_len", "batch_size", "gradient_accumulation", "steps", "tokens"):
        value = getattr(stage, key)
        if value is not None and value <= 0:
            raise LongctxError(f"{where}.{key} must be positive, got {value}")
    if stage.learning_rate <= 0:
        raise LongctxError(f"{where}.learning_rate must be positive, got {stage.learning_rate}")
    if stage.warmup_steps < 0:
        raise LongctxError(f"{where}.warmup_steps must be 0 or more, got {stage.warmup_steps}")
    if stage.lr_schedule not in LR_SCHEDULES:
        raise LongctxError(f"{where}.lr_schedule {stage.lr_schedule!r} is unknown; use one of {', '.join(LR_SCHEDULES)}")
    return stage


def _parse_rope(raw: Any, where: str) -> RopeSpec:
    if raw is None:
        return RopeSpec()
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, dict):
        raise LongctxError(f"{where} must be a method name or a mapping like {{method: yarn}} or {{theta: 1.0e6}}")
    raw = dict(raw)
    method = raw.pop("method", None)
    theta = raw.pop("theta", raw.pop("rope_theta", None))
    factor = raw.pop("factor", None)
    try:
        theta = None if theta is None else float(theta)
        factor = None if factor is None else float(factor)
    except (TypeError, ValueError):
        raise LongctxError(f"{where}: theta and factor must be numbers") from None
    if factor is not None and method is None:
        raise LongctxError(f"{where}: a factor needs a method (e.g. {{method: linear, factor: 4}})")
    if method is not None and str(method) not in METHODS:
        raise LongctxError(f"{where}.method {method!r} is unknown; use one of {', '.join(METHODS)}")
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise LongctxError(f"{where}: unknown rope option(s) {', '.join(unknown)}; the planner takes {', '.join(OPTIONS)}")
    if theta is not None and theta <= 0 or factor is not None and factor <= 0:
        raise LongctxError(f"{where}: theta and factor must be positive")
    return RopeSpec(method=None if method is None else str(method), theta=theta, factor=factor, overrides=raw)


def _parse_data(raw: dict) -> DataConfig:
    if not isinstance(raw, dict):
        raise LongctxError("'data' must be a mapping, e.g. {source: files, paths: [corpus.jsonl]}")
    raw = dict(raw)
    _check_keys(raw, DataConfig, "data")
    passkey_raw = raw.pop("passkey", {}) or {}
    if isinstance(passkey_raw, dict) and isinstance(passkey_raw.get("tasks"), str):
        passkey_raw = {**passkey_raw, "tasks": [passkey_raw["tasks"]]}
    passkey = _parse_simple(passkey_raw, PasskeyConfig, "data.passkey")
    if isinstance(raw.get("paths"), str):
        raw["paths"] = [raw["paths"]]
    data = DataConfig(passkey=passkey, **{key: _coerce(value, DataConfig, key, "data") for key, value in raw.items()})
    if data.source not in DATA_SOURCES:
        raise LongctxError(f"data.source {data.source!r} is unknown; use one of {', '.join(DATA_SOURCES)}")
    if data.source == "files" and not data.paths:
        raise LongctxError("data.paths is empty; list the jsonl, parquet or text files to train on")
    if data.source == "hub" and not data.name:
        raise LongctxError("data.name is missing; give the dataset name for source: hub")
    if passkey.loss not in PASSKEY_LOSS:
        raise LongctxError(f"data.passkey.loss {passkey.loss!r} is unknown; use one of {', '.join(PASSKEY_LOSS)}")
    if not passkey.tasks:
        raise LongctxError(f"data.passkey.tasks is empty; list one or more of {', '.join(TASKS)}")
    for task in passkey.tasks:
        if task not in TASKS:
            raise LongctxError(f"data.passkey.tasks: unknown task {task!r}; use {', '.join(TASKS)}")
    return data


def _parse_simple(raw: Any, cls, where: str):
    if not isinstance(raw, dict):
        raise LongctxError(f"'{where}' must be a mapping of settings")
    _check_keys(raw, cls, where)
    return cls(**{key: _coerce(value, cls, key, where) for key, value in raw.items()})


def _check_keys(raw: dict, cls, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            raise LongctxError(f"unknown key '{key}' in {where}; known keys: {', '.join(known)}")


def _coerce(value: Any, cls, key: str, where: str) -> Any:
    """Check a scalar against the dataclass field's annotation (YAML reads 2e-5 as a string)."""
    annotation = str(next(f.type for f in dataclasses.fields(cls) if f.name == key))
    if value is None:
        if "None" in annotation:
            return None
        raise LongctxError(f"{where}.{key} must not be empty")
    try:
        if annotation.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if annotation.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation.startswith("str"):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if annotation.startswith("list"):
            if not isinstance(value, list):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise LongctxError(f"{where}.{key} must be {annotation.split(' |')[0]}, got {value!r}") from None
    return value


def _validate(config: TrainConfig) -> None:
    if config.mode not in MODES:
        raise LongctxError(f"mode {config.mode!r} is unknown; use full or lora")
    if config.precision not in PRECISIONS:
        raise LongctxError(f"precision {config.precision!r} is unknown; use float32 or bfloat16")
    if config.loss_chunk_size < 0:
        raise LongctxError("loss_chunk_size must be 0 (plain loss) or a positive number of tokens")
    sp = config.parallel.sequence_parallel
    if sp < 1:
        raise LongctxError(f"parallel.sequence_parallel must be 1 or more, got {sp}")
    ulysses = config.parallel.ulysses
    if ulysses < 1 or sp % ulysses:
        raise LongctxError(
            f"parallel.ulysses {ulysses} does not divide sequence_parallel {sp}; choose a divisor of it "
            "(1: the ring alone, sequence_parallel: Ulysses alone, between: Ulysses groups with a ring across them)"
        )
    for i, stage in enumerate(config.stages):
        if sp > 1 and stage.seq_len % (2 * sp):
            raise LongctxError(
                f"stages[{i}].seq_len {stage.seq_len} is not divisible by 2 x sequence_parallel = {2 * sp}; "
                "zigzag ring attention needs that"
            )
    if config.logging.log_every < 1 or config.logging.checkpoint_every < 1 or config.logging.keep_checkpoints < 1:
        raise LongctxError("logging.log_every, checkpoint_every and keep_checkpoints must be 1 or more")
    if config.lora.r < 1:
        raise LongctxError(f"lora.r must be 1 or more, got {config.lora.r}")
    if len(config.optimizer.betas) != 2:
        raise LongctxError("optimizer.betas must be two numbers, e.g. [0.9, 0.95]")


def check_parallel_fits_model(parallel: ParallelConfig, model_config: dict, model: str) -> None:
    """The model's query heads split over the Ulysses degree (checked before any work; the KV heads
    need not: Ulysses repeats them as needed)."""
    heads = model_config.get("num_attention_heads")
    if parallel.ulysses > 1 and isinstance(heads, int) and heads % parallel.ulysses:
        raise LongctxError(
            f"{model} has {heads} query heads, which parallel.ulysses {parallel.ulysses} cannot split; choose a "
            f"ulysses degree that divides {heads} (the ring takes the rest of sequence_parallel)"
        )


def resolve_data_files(paths: list[str]) -> list[str]:
    """Expand globs; every pattern must match a file of a known format."""
    files = []
    for pattern in paths:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise LongctxError(f"data path {pattern} matches no file; check data.paths")
        files.extend(matches)
    formats = {DATASET_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in formats:
        bad = next(f for f in files if Path(f).suffix.lower() not in DATASET_BUILDERS)
        raise LongctxError(f"{bad}: unknown data format; use {', '.join(DATASET_BUILDERS)} files")
    if len(formats) > 1:
        raise LongctxError("data.paths mixes formats; give files of one format (jsonl, parquet, csv or text)")
    return files
