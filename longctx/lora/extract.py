"""Extract the difference between a base model and its fine-tune as a PEFT LoRA adapter.

    base + adapter ~= extended

Tensors are paired by name and processed in the extended model's shard order, a few
pairs side by side on worker threads (as many as there are CPUs, while their summed
footprint stays within that of the largest pair), so peak memory is set by the largest
matrix and not by the model:

- a targeted linear layer's weight delta (float32) is factored into B @ A by
  longctx.lora.lowrank (fixed rank, or the smallest rank keeping an energy fraction);
  its bias delta, if any, becomes `lora_B.bias` (with `lora_bias: true`);
- the input embeddings and lm_head are copied at full rank into `modules_to_save`
  (default), factored as LoRA (`lora_embedding_A/B` for the embedding), or skipped;
- any other changed module (norms) is copied whole into `modules_to_save`;
- unchanged modules are left out, and whatever changed but cannot be expressed
  (a linear layer outside --target-modules) is reported as skipped, never dropped silently.

The adapter's tensors stream into one adapter_model.safetensors (PEFT reads a single
file). Beside it: adapter_config.json, longctx.json (the extended model's rope settings,
which merge_adapters applies; a LoRA alone carries no config) and extraction_report.json
(per module: rank, retained energy, measured relative error ||dW - BA|| / ||dW||).
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longctx.errors import LongctxError
from longctx.lora.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    full_module_key,
    lora_adapter_config,
    lora_key,
    matches_saved,
    matches_target,
    peft_names,
)
from longctx.lora.choices import EMBEDDING_POLICIES, VOCAB_POLICIES
from longctx.lora.lowrank import FactorStats, factor_fixed_rank, factor_for_energy, frobenius_sq, residual_stats
from longctx.lora.threads import available_cpus, cpu_threads, ordered_parallel_map
from longctx.models import TensorReader, atomic_output_dir, check_output_free, read_json, resolve_model, write_json
from longctx.models.dtypes import DTYPE_NAMES, torch_dtype
from longctx.models.layout import ModelLayout, model_layout
from longctx.models.metadata import read_metadata, write_metadata
from longctx.models.reference import reference_path
from longctx.models.writer import SafetensorsWriter
from longctx.rope.config import rope_settings

REPORT_FILE = "extraction_report.json"
COMPARE_BLOCK_BYTES = 64 * 1024**2
DEFAULT_RANK = 64


@dataclass
class ExtractionSettings:
    rank: int | None = None  # fixed rank for every module
    energy: float | None = None  # or: the smallest rank keeping this fraction of sum(s^2)
    max_rank: int | None = None  # cap for --energy
    target_modules: list[str] | None = None  # names or last name segments; None: every linear layer
    embeddings: str = "full"  # full (modules_to_save) | lora | skip
    vocab_policy: str = "error"  # error | keep-base (adapter keeps the base vocabulary)
    dtype: str = "float32"  # of the LoRA factors; full-rank copies keep the extended model's dtype
    device: str = "cpu"
    allow_pickle: bool = False
    seed: int = 0
    workers: int | None = None  # tensor pairs processed side by side; None: the CPUs available

    def validate(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise LongctxError("give either --rank or --energy, not both")
        if self.rank is None and self.energy is None:
            self.rank = DEFAULT_RANK
        if self.rank is not None and self.rank <= 0:
            raise LongctxError(f"--rank must be a positive integer, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LongctxError(f"--energy must be in (0, 1], e.g. 0.9, got {self.energy}")
        if self.max_rank is not None:
            if self.energy is None:
                raise LongctxError("--max-rank caps the rank chosen by --energy; with --rank, set the rank directly")
            if self.max_rank <= 0:
                raise LongctxError(f"--max-rank must be a positive integer, got {self.max_rank}")
        if self.embeddings not in EMBEDDING_POLICIES:
            raise LongctxError(f"--embeddings must be one of {', '.join(EMBEDDING_POLICIES)}, got {self.embeddings!r}")
        if self.vocab_policy not in VOCAB_POLICIES:
            raise LongctxError(f"--vocab-policy must be one of {', '.join(VOCAB_POLICIES)}, got {self.vocab_policy!r}")
        if self.dtype not in DTYPE_NAMES:
            raise LongctxError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.workers is None:
            self.workers = available_cpus()
        if self.workers <= 0:
            raise LongctxError(f"--workers must be a positive integer, got {self.workers}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise LongctxError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def model_inputs(base: str | Path, extended: str | Path) -> dict:
    """The inputs an extraction's output must not overlap (check_output_free)."""
    return {"BASE": reference_path(base), "EXTENDED": reference_path(extended)}


def extract_lora(base_dir: str | Path, extended_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False,
                 show_progress: bool = True, **settings) -> dict:
    """Write a PEFT LoRA adapter with base + adapter ~= extended; returns the report dict.
    settings: the fields of ExtractionSettings (rank, energy, max_rank, target_modules, ...)."""
    settings = ExtractionSettings(**settings)
    settings.validate()
    output_dir = check_output_free(output_dir, overwrite, inputs=model_inputs(base_dir, extended_dir))
    base_dir, extended_dir = resolve_model(base_dir), resolve_model(extended_dir)
    base_config, extended_config = read_json(base_dir / "config.json"), read_json(extended_dir / "config.json")
    rope = rope_settings(extended_config)
    started = time.perf_counter()
    if bool(_tied(base_config)) != bool(_tied(extended_config)):
        raise LongctxError("BASE and EXTENDED differ in tie_word_embeddings; the models have different architectures")
    with TensorReader(base_dir, allow_pickle=settings.allow_pickle) as base, \
            TensorReader(extended_dir, allow_pickle=settings.allow_pickle) as extended:
        layout = model_layout(base_dir, base_config, {name: base.shape(name) for name in base.names()})
        if layout.tied_embeddings and settings.embeddings == "lora":
            raise LongctxError(
                "--embeddings lora is not supported for models with tied embeddings (PEFT does not merge a LoRA on tied "
                "embeddings correctly); use --embeddings full (the default) or skip"
            )
        check_compatible(base_config, extended_config, base, extended, layout, settings)
        _check_targets(settings, layout)
        names = [name for name in extended.names() if name not in layout.optional_tensors()]
        with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
            # one file however large (PEFT reads a single adapter_model.safetensors), ranks known as modules finish
            with SafetensorsWriter(tmp, file_name=ADAPTER_WEIGHTS, max_shard_bytes=None) as writer:
                extractor = _Extractor(base, extended, layout, settings, writer)
                extractor.run(names, show_progress)
                if not writer.names():
                    raise LongctxError("BASE and EXTENDED have identical weights: there is no difference to extract")
                with extractor.tally.timing("write"):
                    writer.close()
            write_json(tmp / ADAPTER_CONFIG, extractor.adapter_config(str(base_dir)))
            report = _report(base_dir, extended_dir, settings, extractor, writer.total_bytes, time.perf_counter() - started)
            write_json(tmp / REPORT_FILE, report)
            write_sidecar(tmp, base_dir, extended_dir, rope)
    report["output"] = str(output_dir)
    return report


# ---------------------------------------------------------------------------------------
# Checks before any work: same architecture, same tensors, same shapes.


def _tied(config: dict) -> bool:
    return config.get("text_config", config).get("tie_word_embeddings", config.get("tie_word_embeddings", False))


def _config_summary(config: dict) -> tuple:
    text = config.get("text_config", config)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return tuple(text.get(key) for key in keys)


def check_compatible(base_config: dict, extended_config: dict, base: TensorReader, extended: TensorReader,
                     layout: ModelLayout, settings: ExtractionSettings) -> None:
    architectures = [tuple(config["architectures"]) for config in (base_config, extended_config) if config.get("architectures")]
    # a config converted from GGUF names no architecture: compare only when both do
    if _config_summary(base_config) != _config_summary(extended_config) or len(set(architectures)) > 1:
        raise LongctxError(
            f"BASE and EXTENDED have different architectures ({_config_summary(base_config)} vs "
            f"{_config_summary(extended_config)}); extract-lora needs a model and its own fine-tune"
        )
    ignored = layout.optional_tensors()
    base_names = set(base.names()) - ignored
    extended_names = set(extended.names()) - ignored
    for missing, where in ((extended_names - base_names, "BASE"), (base_names - extended_names, "EXTENDED")):
        if missing:
            listed = ", ".join(sorted(missing)[:3]) + (" ..." if len(missing) > 3 else "")
            raise LongctxError(
                f"{len(missing)} tensor(s) missing from {where} ({listed}); the models have different architectures"
            )
    vocabulary_tensors = {f"{m}.weight" for m in (layout.embedding_module, layout.lm_head_module) if m}
    for name in sorted(extended_names):
        base_shape, extended_shape = base.shape(name), extended.shape(name)
        if base_shape == extended_shape:
            continue
        if name in vocabulary_tensors and base_shape[1:] == extended_shape[1:]:
            if settings.vocab_policy == "keep-base":
                continue
            raise LongctxError(
                f"vocabulary sizes differ ({name}: BASE {base_shape[0]} rows, EXTENDED {extended_shape[0]}); pass "
                "--vocab-policy keep-base to keep the base vocabulary (rows beyond it are dropped and reported)"
            )
        raise LongctxError(
            f"tensor {name} has shape {list(base_shape)} in BASE and {list(extended_shape)} in EXTENDED; "
            "the models have different architectures"
        )


def _check_targets(settings: ExtractionSettings, layout: ModelLayout) -> None:
    if not settings.target_modules:
        return
    linear = [m for m, kind in layout.module_kind.items() if kind == "linear"]
    unknown = [t for t in settings.target_modules if not any(matches_target(m, t) for m in linear)]
    if unknown:
        examples = sorted({m.rsplit(".", 1)[-1] for m in linear})
        raise LongctxError(f"--target-modules {', '.join(unknown)} match no linear layer; choose from {', '.join(examples)}")


# ---------------------------------------------------------------------------------------
# The pass over the tensor pairs. Worker threads load, compare and factor the pairs (each
# torch op on one CPU thread, see longctx.lora.threads); the main thread records the
# outcomes and writes the adapter in checkpoint order.


@dataclass
class _Task:
    """What to do with one tensor pair, decided before reading it from the layout and the settings."""

    name: str
    module: str | None  # None: a tensor that is no module parameter
    param: str | None
    action: str  # "factor" | "bias" | "full" (copy to modules_to_save) | "skip" (report it if it changed)
    reason: str = ""  # why a changed tensor is skipped
    footprint: int = 0  # bytes it may hold at once: the pair, plus the float32 delta and workspace


@dataclass
class _Outcome:
    """What a worker found for one task."""

    task: _Task
    changed: bool
    tally: Tally
    tensor: torch.Tensor | None = None  # full: EXTENDED's tensor; bias: the float32 delta
    factored: FactoredDelta | None = None
    dropped_rows: int = 0


class _Extractor:
    """One pass over the tensor pairs: decisions per module, factors and copies streamed to the writer."""

    def __init__(self, base: TensorReader, extended: TensorReader, layout: ModelLayout, settings: ExtractionSettings,
                 writer: SafetensorsWriter):
        self.base, self.extended, self.layout, self.settings, self.writer = base, extended, layout, settings, writer
        self.out_dtype = torch_dtype(settings.dtype)
        self.modules: dict[str, dict] = {}  # module -> its report entry
        self.ranks: dict[str, int] = {}  # every module with LoRA factors -> rank
        self.lora_targets: set[str] = set()  # the linear ones (lora_A/B; not lora_embedding_A/B)
        self.bias_deltas: dict[str, torch.Tensor] = {}
        self.full_modules: set[str] = set()
        self.written_full: set[str] = set()
        self.tally = Tally()  # summed over all tensor pairs (worker seconds) and the main thread's writes
        self.loop_seconds = 0.0
        # a pickle reader keeps one shard loaded: workers would take turns reloading shards
        self.workers = 1 if base.is_pickle or extended.is_pickle else settings.workers

    def targeted(self, module: str) -> bool:
        """Whether a module's delta is factored into LoRA (else copied whole, or skipped)."""
        kind = self.layout.module_kind[module]
        if kind in ("embedding", "lm_head"):
            return self.settings.embeddings == "lora"
        if kind != "linear":
            return False
        targets = self.settings.target_modules
        return targets is None or any(matches_target(module, t) for t in targets)

    def entry(self, module: str, **fields) -> dict:
        item = self.modules.setdefault(module, {"module": module, "kind": "unchanged"})
        item.update(fields)
        return item

    def task(self, name: str) -> _Task:
        mapped = self.layout.param_module.get(name)
        if not mapped:
            return self._sized(_Task(name, None, None, "skip", "changed tensor that is no module parameter PEFT can load"))
        module, param = mapped
        kind = self.layout.module_kind[module]
        if kind in ("embedding", "lm_head") and self.settings.embeddings == "skip":
            task = _Task(name, module, param, "skip", "changed embedding (--embeddings skip)")
        elif kind == "linear" and not self.targeted(module):
            task = _Task(name, module, param, "skip", "changed linear layer not in --target-modules")
        elif self.targeted(module):
            task = _Task(name, module, param, "factor" if param == "weight" else "bias")
        else:  # norms, full-rank embeddings: the whole module goes to modules_to_save
            task = _Task(name, module, param, "full")
        return self._sized(task)

    def _sized(self, task: _Task) -> _Task:
        numel = math.prod(self.extended.shape(task.name))
        task.footprint = numel * (self.base.dtype(task.name).itemsize + self.extended.dtype(task.name).itemsize)
        if task.action in ("factor", "bias"):
            task.footprint += 8 * numel  # the float32 delta and the residual's row blocks
        return task

    def run(self, tensor_names: list[str], show_progress: bool) -> None:
        from tqdm.auto import tqdm

        tasks = [self.task(name) for name in tensor_names]
        budget = max((task.footprint for task in tasks), default=0)
        started = time.perf_counter()
        with tqdm(total=len(tasks), desc="extract-lora", unit="tensor", disable=not show_progress) as bar, cpu_threads(1):
            outcomes = ordered_parallel_map(self.load, tasks, cost=lambda task: task.footprint, budget=budget,
                                            workers=self.workers)
            for outcome in outcomes:
                self.record(outcome)
                rate = self.tally.bytes_read / max(time.perf_counter() - started, 1e-9) / 1e6
                bar.update()
                bar.set_postfix_str(f"{rate:.0f} MB/s", refresh=False)
            self.finish()
        self.loop_seconds = time.perf_counter() - started

    # --- in the workers: read, compare, factor

    def load(self, task: _Task) -> _Outcome:
        outcome = _Outcome(task, changed=True, tally=Tally())
        if task.action == "skip":  # only whether it changed
            outcome.changed = not self.identical(task.name, outcome.tally)
            return outcome
        pair = self.changed_pair(task.name, outcome.tally)
        if pair is None:
            outcome.changed = False
            return outcome
        base_tensor, extended_tensor = pair
        fitted, outcome.dropped_rows = _on_base_rows(base_tensor, extended_tensor)
        refitted = fitted is not extended_tensor
        del pair, extended_tensor
        if task.action == "full":
            outcome.tensor = fitted
            return outcome
        if refitted and torch.equal(base_tensor, fitted):
            outcome.changed = False  # only dropped vocabulary rows differed
            return outcome
        with outcome.tally.timing("factorize"):
            delta = weight_delta(base_tensor, fitted, self.settings.device)
        del base_tensor, fitted  # the delta is all the factorization needs
        if task.action == "bias":
            outcome.tensor = delta.cpu()
        else:
            if self.layout.module_kind[task.module] == "embedding":
                delta = delta.T  # PEFT's embedding delta is (B @ A)^T, A is r x num_embeddings
            outcome.factored = factor_delta(delta, self.settings, generator=tensor_generator(self.settings.seed, task.name),
                                            tally=outcome.tally)
        return outcome

    def read(self, reader: TensorReader, name: str, tally: Tally, rows: slice | None = None) -> torch.Tensor:
        with tally.timing("read"):
            tensor = reader.get(name, rows)
        tally.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def nbytes(self, name: str) -> int:
        return math.prod(self.extended.shape(name)) * self.extended.dtype(name).itemsize

    def changed_pair(self, name: str, tally: Tally) -> tuple[torch.Tensor, torch.Tensor] | None:
        """BASE's and EXTENDED's tensors, or None when they are equal. Each is read once;
        a tensor larger than COMPARE_BLOCK_BYTES is first compared block by block, so an
        unchanged embedding never needs two full copies in memory."""
        large = self.nbytes(name) > COMPARE_BLOCK_BYTES
        if large and self.identical(name, tally):
            return None
        base_tensor, extended_tensor = self.read(self.base, name, tally), self.read(self.extended, name, tally)
        if not large and base_tensor.shape == extended_tensor.shape:
            with tally.timing("compare"):
                if torch.equal(base_tensor.to(extended_tensor.dtype), extended_tensor):
                    return None
        return base_tensor, extended_tensor

    def identical(self, name: str, tally: Tally) -> bool:
        """Equal in both models, compared block by block (a block at a time in memory)."""
        shape = self.base.shape(name)
        if shape != self.extended.shape(name):
            return False
        if not shape or self.base.dtype(name) != self.extended.dtype(name):
            base_tensor, extended_tensor = self.read(self.base, name, tally), self.read(self.extended, name, tally)
            with tally.timing("compare"):
                return torch.equal(base_tensor.to(extended_tensor.dtype), extended_tensor)
        rows_per_block = max(1, COMPARE_BLOCK_BYTES // (math.prod(shape[1:]) * self.base.dtype(name).itemsize))
        for start in range(0, shape[0], rows_per_block):
            rows = slice(start, start + rows_per_block)
            base_block, extended_block = self.read(self.base, name, tally, rows), self.read(self.extended, name, tally, rows)
            with tally.timing("compare"):
                if not torch.equal(base_block, extended_block):
                    return False
        return True

    # --- in the main thread: record, write

    def record(self, outcome: _Outcome) -> None:
        task = outcome.task
        self.tally.add(outcome.tally)
        if outcome.dropped_rows:
            self.entry(task.module, dropped_vocabulary_rows=outcome.dropped_rows)
        if not outcome.changed:
            if task.module:
                self.entry(task.module)
            return
        with self.tally.timing("write"):
            if task.action == "skip":
                self.entry(task.module or task.name, kind="skipped", reason=task.reason)
            elif task.action == "bias":
                self.bias_deltas[task.module] = outcome.tensor
            elif task.action == "full":
                self.full_modules.add(task.module)
                self.entry(task.module, kind="modules_to_save", shape=list(outcome.tensor.shape))
                self.write_full(task.module, task.param, outcome.tensor)
            else:
                self.write_factors(task.module, outcome.factored)

    def write_factors(self, module: str, factored: FactoredDelta) -> None:
        is_embedding = self.layout.module_kind[module] == "embedding"
        if not is_embedding:
            self.lora_targets.add(module)
        self.writer.write(lora_key(module, "A", embedding=is_embedding), factored.A)
        self.writer.write(lora_key(module, "B", embedding=is_embedding), factored.B)
        self.ranks[module] = factored.stats.rank
        self.entry(
            module,
            kind="lora_embedding" if is_embedding else "lora",
            shape=list(self.base.shape(f"{module}.weight")),
            rank=factored.stats.rank,
            retained_energy=round(factored.stats.retained_energy, 8),
            relative_error=factored.stats.relative_error,
            method=factored.method,
            seconds=factored.seconds,
        )

    def write_full(self, module: str, param: str, tensor: torch.Tensor) -> None:
        self.writer.write(full_module_key(module, param), tensor)
        self.written_full.add(f"{module}.{param}")
        if self.layout.tied_embeddings and module == self.layout.embedding_module and param == "weight":
            # PEFT with ensure_weight_tying loads lm_head's copy of the tied embedding too
            self.writer.write(full_module_key(self.layout.lm_head_module, "weight"), tensor)

    def adapter_config(self, base_model: str) -> dict:
        adapted = set(self.ranks)  # linear layers, lm_head, and the embedding when it is a LoRA
        return lora_adapter_config(
            base_model=base_model,
            ranks=self.ranks,
            target_modules=peft_names(adapted, self.layout.all_modules, matches_target),
            modules_to_save=peft_names(self.full_modules, self.layout.all_modules, matches_saved),
            lora_bias=bool(self.bias_deltas),
            ensure_weight_tying=self.layout.tied_embeddings and self.layout.embedding_module in self.full_modules,
        )

    def add_zero_lora(self, module: str, method: str) -> None:
        out_features, in_features = self.base.shape(f"{module}.weight")
        self.writer.write(lora_key(module, "A"), torch.zeros(1, in_features, dtype=self.out_dtype))
        self.writer.write(lora_key(module, "B"), torch.zeros(out_features, 1, dtype=self.out_dtype))
        self.lora_targets.add(module)
        self.ranks[module] = 1
        self.entry(module, kind="lora", shape=[out_features, in_features], rank=1, method=method)

    def finish(self) -> None:
        # modules_to_save replaces the whole module: write its unchanged parameters too
        for module in sorted(self.full_modules):
            for param in self.layout.module_params[module]:
                name = f"{module}.{param}"
                if name not in self.written_full and name in self.extended:
                    base_tensor = self.read(self.base, name, self.tally)
                    self.write_full(module, param, _on_base_rows(base_tensor, self.read(self.extended, name, self.tally))[0])
        # a bias delta needs a LoRA layer to ride on: modules whose weight is unchanged get zero rank-1 factors
        for module in self.bias_deltas:
            if module not in self.lora_targets:
                self.add_zero_lora(module, "bias only")
            self.entry(module, bias_changed=True)
        if self.full_modules and not self.ranks:
            # PEFT refuses an adapter that adapts no module: only modules_to_save changed
            linear = [m for m, kind in self.layout.module_kind.items() if kind == "linear" and f"{m}.weight" in self.base]
            first_linear = linear[0]
            self.add_zero_lora(first_linear, "placeholder (PEFT needs one LoRA module)")
        if not self.bias_deltas:
            return
        # with lora_bias every LoRA linear layer has a bias in lora_B: zeros where nothing changed
        for module in sorted(self.lora_targets):
            bias = self.bias_deltas.get(module)
            if bias is None:
                bias = torch.zeros(self.base.shape(f"{module}.weight")[0])
            self.writer.write(lora_key(module, "bias"), bias.to(self.out_dtype))


# ---------------------------------------------------------------------------------------
# One tensor pair: its delta, its factors, and what reading and factoring it cost.


@dataclass
class Tally:
    """Bytes read and seconds per phase, of one tensor pair or (summed) of a whole run."""

    bytes_read: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timing(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def add(self, other: "Tally") -> None:
        self.bytes_read += other.bytes_read
        for phase, seconds in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


@dataclass
class FactoredDelta:
    """LoRA factors of one module's delta (B @ A ~ delta, already in the output dtype) and their measured error."""

    A: torch.Tensor
    B: torch.Tensor
    stats: FactorStats
    method: str  # "exact" or "randomized"
    seconds: float


def weight_delta(base_tensor: torch.Tensor, extended_tensor: torch.Tensor, device: str) -> torch.Tensor:
    """EXTENDED - BASE in float32 on `device`, with one allocation (no float32 copy of BASE)."""
    delta = extended_tensor.to(device, torch.float32, copy=True)
    delta -= base_tensor.to(device)
    return delta


def factor_delta(delta: torch.Tensor, settings: ExtractionSettings, *, generator: torch.Generator,
                 tally: Tally) -> FactoredDelta:
    """Factors of a float32 delta at the settings' rank or energy, cast to the output dtype,
    and their relative error measured with the factors as cast."""
    started = time.perf_counter()
    with tally.timing("factorize"):
        total = frobenius_sq(delta)
        if settings.rank is not None:
            factors = factor_fixed_rank(delta, settings.rank, generator=generator)
        else:
            factors = factor_for_energy(delta, settings.energy, max_rank=settings.max_rank, generator=generator)
        out_dtype = torch_dtype(settings.dtype)
        a, b = factors.A.to(out_dtype), factors.B.to(out_dtype)
    with tally.timing("measure error"):
        stats = residual_stats(delta, a, b, total_energy=total)
    return FactoredDelta(a.cpu(), b.cpu(), stats, factors.method, round(time.perf_counter() - started, 4))


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The randomized SVD's generator for one tensor: set by the seed and the tensor's name
    alone, so the adapter does not depend on the order in which workers reach the tensors."""
    return torch.Generator().manual_seed((seed * 2**32 + zlib.crc32(name.encode())) % 2**63)


def _on_base_rows(base_tensor: torch.Tensor, extended_tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The extended tensor fitted to the base vocabulary (keep-base): shared rows from
    EXTENDED, the rest from BASE. Returns it and the number of EXTENDED rows dropped."""
    if base_tensor.shape == extended_tensor.shape:
        return extended_tensor, 0
    shared = min(base_tensor.shape[0], extended_tensor.shape[0])
    fitted = base_tensor.clone()
    fitted[:shared] = extended_tensor[:shared]
    return fitted, max(0, extended_tensor.shape[0] - shared)


# ---------------------------------------------------------------------------------------
# Beside the adapter: the rope sidecar and the report.


def write_sidecar(adapter_dir: Path, base_dir: Path, extended_dir: Path, rope: dict, **fields) -> dict:
    """longctx.json: EXTENDED's rope settings (which merge_adapters applies) and where the adapter came from."""
    return write_metadata(
        adapter_dir, "lora-adapter",
        rope_parameters=rope["rope_parameters"], max_position_embeddings=rope["max_position_embeddings"],
        base_model=str(base_dir), extended_model=str(extended_dir), extended_model_metadata=read_metadata(extended_dir),
        report_file=REPORT_FILE, **fields,
    )


def _report(base_dir: Path, extended_dir: Path, settings: ExtractionSettings, extractor: _Extractor,
            adapter_bytes: int, seconds: float) -> dict:
    modules = list(extractor.modules.values())
    lora = [m for m in modules if m["kind"] in ("lora", "lora_embedding") and m.get("method") in ("exact", "randomized")]
    errors = [m["relative_error"] for m in lora]
    return {
        "engine": "longctx",
        "base_model": str(base_dir),
        "extended_model": str(extended_dir),
        "settings": {
            "rank": settings.rank, "energy": settings.energy, "max_rank": settings.max_rank,
            "target_modules": settings.target_modules, "embeddings": settings.embeddings,
            "vocab_policy": settings.vocab_policy, "dtype": settings.dtype, "device": settings.device, "seed": settings.seed,
        },
        "summary": {**summarize(modules, adapter_bytes, seconds, errors), "timings": _timings(extractor, seconds)},
        "modules": [m for m in modules if m["kind"] != "unchanged"],
    }


def _timings(extractor: _Extractor, seconds: float) -> dict:
    """Where the time went: set-up (layout, checks) vs the pass over the tensors, and per
    phase the seconds summed over the workers (so they may add up to more than the pass)."""
    tally, loop = extractor.tally, extractor.loop_seconds
    return {
        "workers": extractor.workers,
        "setup_seconds": round(seconds - loop, 3),
        "tensor_pass_seconds": round(loop, 3),
        "phase_seconds": {phase: round(value, 3) for phase, value in tally.seconds.items()},
        "bytes_read": tally.bytes_read,
        "read_mb_per_second": round(tally.bytes_read / max(loop, 1e-9) / 1e6, 1),
    }


def summarize(modules: list[dict], adapter_bytes: int, seconds: float, errors: list[float]) -> dict:
    kinds = ("lora", "lora_embedding", "modules_to_save", "skipped", "unchanged")
    count = {kind: sum(1 for m in modules if m["kind"] == kind) for kind in kinds}
    ranks = [m["rank"] for m in modules if m.get("rank")]
    return {
        "modules": count,
        "rank_min": min(ranks, default=0),
        "rank_max": max(ranks, default=0),
        "rank_mean": round(sum(ranks) / len(ranks), 2) if ranks else 0,
        "relative_error_mean": sum(errors) / len(errors) if errors else 0.0,
        "relative_error_max": max(errors, default=0.0),
        "adapter_bytes": adapter_bytes,
        "seconds": round(seconds, 2),
    }
