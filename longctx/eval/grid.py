"""A needle-in-a-haystack grid run: lengths x depths x samples, resumable, with its output files.

Output directory:
- settings.json: what defines a cell's result (model, task, haystack, scoring, prompt, seed);
  a resumed run must match it;
- results.jsonl: one JSON object per finished sample, appended and flushed as soon as it is done,
  so an interrupted run loses at most the sample in flight;
- summary.json: mean score overall, per length, per depth and per cell, the effective length,
  the settings and the model;
- heatmap.png: depth x length, red-yellow-green, the mean score in each cell.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longctx.errors import LongctxError
from longctx.eval.engine import DEFAULT_CHUNK, check_memory
from longctx.eval.heatmap import plot_heatmap
from longctx.models.output import atomic_output_dir
from longctx.tasks.retrieval import Task
from longctx.units import length_label

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SETTINGS = "settings.json"
SUMMARY = "summary.json"
HEATMAP = "heatmap.png"
DEFAULT_THRESHOLD = 0.85


@dataclass
class NeedleSettings:
    """The settings a cell's result depends on (resuming requires the same ones)."""

    model: str
    task: str = "passkey"
    value_type: str = "numbers"
    haystack: str = "noise"
    scoring: str = "generate"
    prompt: str = "auto"
    seed: int = 0
    needle: str | None = None
    question: str | None = None
    answer_prefix: str | None = None
    answer: str | None = None

    def make_task(self) -> Task:
        return Task(self.task, self.value_type, self.needle, self.question, self.answer_prefix, self.answer)


@dataclass
class GridPlan:
    lengths: list[int]
    depths: list[float]
    samples: int = 1
    prefix_reuse: bool = True
    chunk_size: int = DEFAULT_CHUNK
    threshold: float = DEFAULT_THRESHOLD
    device: str = "cpu"  # where the model runs (the scores do not depend on it, so resuming elsewhere is fine)
    sequence_parallel: int = 1  # processes the KV caches are sharded over (torchrun's world size)
    cells: list[tuple[int, float, int]] = field(init=False)

    def __post_init__(self):
        if not self.lengths:
            raise LongctxError("no lengths given; pass --lengths 1k,2k,4k or --min-len/--max-len")
        if any(length <= 0 for length in self.lengths):
            raise LongctxError("lengths must be positive token counts")
        bad = [d for d in self.depths if not 0.0 <= d <= 100.0]
        if bad or not self.depths:
            raise LongctxError(f"depths {bad or '(none)'} outside 0-100; give depths as percentages from 0 to 100")
        if self.samples < 1:
            raise LongctxError("--samples must be at least 1")
        if not 0.0 < self.threshold <= 1.0:
            raise LongctxError(f"--threshold {self.threshold:g} is outside (0, 1]; give the mean score a length must reach, "
                               "e.g. 0.85")
        if self.chunk_size < 1:
            raise LongctxError("--chunk-size must be a positive number of tokens")
        if self.sequence_parallel < 1:
            raise LongctxError(f"--sequence-parallel {self.sequence_parallel} must be at least 1")
        self.lengths = sorted(set(self.lengths))
        self.depths = sorted(set(float(d) for d in self.depths))
        self.cells = [(length, depth, i) for length in self.lengths for depth in self.depths for i in range(self.samples)]


def linear_lengths(min_len: int, max_len: int, count: int) -> list[int]:
    """count lengths evenly spaced from min_len to max_len (gkamradt's np.linspace + round)."""
    if count < 1 or min_len > max_len:
        raise LongctxError("need --min-len <= --max-len and --num-lengths >= 1")
    if count == 1:
        return [max_len]
    return [round(min_len + (max_len - min_len) * i / (count - 1)) for i in range(count)]


def grid_depths(count: int, spacing: str = "linear") -> list[float]:
    """count depths from 0 to 100: evenly spaced, or sigmoid-spaced (denser near both ends, as gkamradt)."""
    if count < 1:
        raise LongctxError("--num-depths must be at least 1")
    if count == 1:
        return [50.0]
    steps = [100.0 * i / (count - 1) for i in range(count)]
    if spacing == "linear":
        return [round(d, 3) for d in steps]
    if spacing == "sigmoid":
        return sorted({round(100.0 / (1 + math.exp(-0.1 * (x - 50))), 3) if 0 < x < 100 else x for x in steps})
    raise LongctxError(f"unknown depth spacing {spacing!r}: choose linear or sigmoid")


def prepare_output(output: Path, settings: NeedleSettings, *, resume: bool, overwrite: bool) -> list[dict]:
    """Create the output directory (or reopen it with --resume); returns the rows already done."""
    wanted = asdict(settings)
    if output.exists() and resume:
        saved_path = output / SETTINGS
        if not saved_path.is_file():
            raise LongctxError(f"{output} has no {SETTINGS}; it is not a needle run, so it cannot be resumed")
        saved = json.loads(saved_path.read_text())
        changed = sorted(key for key in wanted.keys() | saved.keys() if wanted.get(key) != saved.get(key))
        if changed:
            raise LongctxError(
                f"cannot resume {output}: settings differ ({', '.join(changed)}); use the same ones or a new --output"
            )
        rows = read_results(output / RESULTS)
        if rows:  # rewrite without a line an interruption cut short, so appends start on a fresh line
            temporary = output / (RESULTS + ".tmp")
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(temporary, output / RESULTS)
        return rows
    if output.exists() and not overwrite:
        raise LongctxError(f"output {output} already exists; pass --resume to continue it or --overwrite to replace it")
    with atomic_output_dir(output, overwrite=overwrite) as tmp:  # a run killed here leaves no half-begun output
        (tmp / SETTINGS).write_text(json.dumps(wanted, indent=2) + "\n")
    return []


def start_results(output: Path, settings, cells: list, key, *, resume: bool, overwrite: bool,
                  sharding=None) -> tuple[list[dict], list]:
    """Open the output (prepare_output) and return the rows already done and the cells still to run.
    With a `sharding`, rank 0 alone opens it (a refusal there is raised on every rank), the other
    ranks get no rows and rank 0's cells."""
    if sharding is not None:
        from longctx.eval.sharded import from_rank_zero, on_every_rank

        main = sharding.rank == 0
        rows, todo = on_every_rank(sharding, lambda: start_results(
            output, settings, cells, key, resume=resume, overwrite=overwrite) if main else ([], None))
        return rows, from_rank_zero(sharding, todo)
    rows = prepare_output(output, settings, resume=resume, overwrite=overwrite)
    done = {key(row) for row in rows}
    todo = [cell for cell in cells if cell not in done]
    if done:
        log.info("resuming: %d of %d samples already done", len(cells) - len(todo), len(cells))
    return rows, todo


def read_results(path: Path) -> list[dict]:
    """Rows of results.jsonl; a last line cut short by an interruption is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("dropping an unfinished line of %s", path)
    return rows


def append_result(path: Path, row: dict) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(row) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def cell_key(row: dict) -> tuple[int, float, int]:
    return int(row["length"]), float(row["depth"]), int(row["sample"])


def summarize(rows: list[dict], plan: GridPlan, settings: NeedleSettings, model_name: str, seconds: float) -> dict:
    """Mean scores of the plan's cells: overall, per length, per depth, per cell; the effective length."""
    wanted = set(plan.cells)
    rows = [row for row in rows if cell_key(row) in wanted]

    def mean(values):
        values = list(values)
        return round(sum(values) / len(values), 4) if values else None

    per_length = {str(L): mean(r["score"] for r in rows if r["length"] == L) for L in plan.lengths}
    per_depth = {f"{d:g}": mean(r["score"] for r in rows if r["depth"] == d) for d in plan.depths}
    per_cell = {
        f"{L}@{d:g}": mean(r["score"] for r in rows if r["length"] == L and r["depth"] == d)
        for L in plan.lengths
        for d in plan.depths
    }
    passing = [L for L in plan.lengths if per_length[str(L)] is not None and per_length[str(L)] >= plan.threshold]
    return {
        "model": model_name,
        "mean_score": mean(r["score"] for r in rows),
        "effective_length": max(passing) if passing else 0,
        "threshold": plan.threshold,
        "per_length": per_length,
        "per_depth": per_depth,
        "per_cell": per_cell,
        "samples_done": len(rows),
        "samples_planned": len(plan.cells),
        "lengths": plan.lengths,
        "depths": plan.depths,
        "samples_per_cell": plan.samples,
        "prefix_reuse": plan.prefix_reuse,
        "seconds": round(seconds, 1),
        "settings": asdict(settings),
    }


def format_table(summary: dict) -> str:
    """Depth rows x length columns of mean scores, plus the per-length means."""
    lengths, depths = summary["lengths"], summary["depths"]
    header = "depth % | " + " | ".join(f"{length_label(L):>6}" for L in lengths)
    lines = [header, "-" * len(header)]
    for depth in depths:
        cells = [summary["per_cell"][f"{L}@{depth:g}"] for L in lengths]
        lines.append(f"{depth:>7g} | " + " | ".join(f"{c:6.2f}" if c is not None else "     -" for c in cells))
    lines.append("-" * len(header))
    lines.append("   mean | " + " | ".join(
        f"{summary['per_length'][str(L)]:6.2f}" if summary["per_length"][str(L)] is not None else "     -" for L in lengths
    ))
    return "\n".join(lines)


def heatmap_title(summary: dict) -> str:
    settings = summary["settings"]
    task = settings["task"] + (f" ({settings['value_type']})" if settings["task"] not in ("passkey", "reverse", "needle") else "")
    return (
        f"{summary['model']}\n{task}, haystack {settings['haystack']}, {summary.get('prompt_style', settings['prompt'])} "
        f"prompt, {settings['scoring']} scoring, "
        f"{summary['samples_per_cell']} sample(s)/cell\nmean {summary['mean_score']}, "
        f"effective length {length_label(summary['effective_length']) if summary['effective_length'] else 'none'} "
        f"(>= {summary['threshold']})"
    )


def run_grid(
    settings: NeedleSettings, plan: GridPlan, output: str | Path, *, resume: bool = False, overwrite: bool = False,
    progress: bool = True, allow_pickle: bool = False,
) -> dict:
    """Run (or resume) a grid, writing results as they finish; returns the summary.

    With plan.sequence_parallel P > 1 this is one of P torchrun processes: every rank evaluates every
    cell with its share of the KV caches (eval/sharded.py), and rank 0 alone checks and writes the
    output and returns the summary (the others return None). A refusal on any rank is raised on all,
    before the first write."""
    from longctx.eval.sharded import check_world, joined, on_every_rank
    from longctx.models import resolve_device

    output = Path(output)
    task = settings.make_task()  # validate before touching the output or loading the model
    check_world(plan.sequence_parallel)
    with joined(plan.sequence_parallel, resolve_device(plan.device)) as sharding:
        main = sharding is None or sharding.rank == 0
        evaluator, model_dir, model_name = on_every_rank(
            sharding, lambda: _grid_evaluator(settings, plan, task, output, resume, overwrite, allow_pickle, sharding),
        )
        done_rows, todo = start_results(output, settings, plan.cells, cell_key, resume=resume, overwrite=overwrite,
                                        sharding=sharding)
        seconds = _run_cells(evaluator, todo, done_rows, output if main else None, progress and main)
        if not main:
            return None
        summary = summarize(done_rows, plan, settings, model_name, seconds)
        summary["prompt_style"] = evaluator.style
        summary["model_path"] = str(model_dir)
        write_summary(output, summary)
        return summary


def _grid_evaluator(settings, plan, task, output, resume, overwrite, allow_pickle, sharding):
    """(Evaluator, model directory, model name) after every check a grid makes before its first write."""
    from longctx.eval.runner import Evaluator
    from longctx.tasks.haystacks import haystack_path

    model_dir, model, tokenizer, model_name = load_for_run(
        settings, output, {"the haystack": haystack_path(settings.haystack)}, lengths=plan.lengths,
        chunk_size=plan.chunk_size, reuse=plan.prefix_reuse, resume=resume, overwrite=overwrite,
        allow_pickle=allow_pickle, device=plan.device, sharding=sharding,
    )
    evaluator = Evaluator(
        model, tokenizer, task, max_length=max(plan.lengths), haystack=settings.haystack,
        prompt_style=settings.prompt, scoring=settings.scoring, prefix_reuse=plan.prefix_reuse,
        chunk_size=plan.chunk_size, seed=settings.seed, sharding=sharding,
    )
    evaluator.builder.build(task.sample(random.Random(0)), min(plan.lengths), 0.0)  # refuses a too-short length
    return evaluator, model_dir, model_name


def _run_cells(evaluator, todo: list, done_rows: list, output: Path | None, progress: bool) -> float:
    """Evaluate the cells still to do, appending each row to done_rows (and to output's results when
    given); returns the seconds it took."""
    from tqdm import tqdm

    started = time.perf_counter()
    bar = tqdm(todo, desc="needle", unit="sample", disable=not progress or not todo)
    scores = []
    for length, depth, index in bar:
        row = evaluator.evaluate(length, depth, index).to_json()
        if output is not None:
            append_result(output / RESULTS, row)
        done_rows.append(row)
        scores.append(row["score"])
        bar.set_postfix_str(f"L={length_label(length)} depth={depth:g} mean={sum(scores) / len(scores):.2f}")
    bar.close()
    return time.perf_counter() - started


def load_for_run(
    settings, output: Path, inputs: dict, *, lengths: list[int], chunk_size: int, reuse: bool, resume: bool,
    overwrite: bool, allow_pickle: bool, device: str = "cpu", sharding=None,
):
    """What a grid or suite run checks before any work, then its model: not both --resume and
    --overwrite; an output that is free of the model and `inputs` and exists only with --resume or
    --overwrite (rank 0's checks, with a `sharding`); memory for the longest length (this rank's
    share); an attention the sharded cache can stand in for; with a sharding, the decoder layers' weights
    sharded over its ranks. Returns (model_dir, model, tokenizer,
    model_name)."""
    from longctx.eval.sharded import check_shardable, rank_device, shard_weights
    from longctx.models import check_output_free, load_model_and_tokenizer, resolve_device, resolve_model
    from longctx.models.reference import reference_path

    checks_output = sharding is None or sharding.rank == 0
    if resume and overwrite:
        raise LongctxError("--resume continues the run in --output and --overwrite replaces it; pass one of them")
    if checks_output:
        check_output_free(output, overwrite or resume, inputs={"the model": reference_path(settings.model), **inputs})
    model_dir = resolve_model(settings.model)
    device = resolve_device(device)
    if sharding is not None:
        _refuse_self_extend(model_dir)
        device = rank_device(device)
    if checks_output and output.exists() and not (resume or overwrite):
        prepare_output(output, settings, resume=False, overwrite=False)  # raises: refuse before any work
    model, tokenizer = load_model_and_tokenizer(model_dir, allow_pickle=allow_pickle, device=device)
    model_name = Path(settings.model).name if Path(settings.model).exists() else settings.model
    if sharding is not None:
        check_shardable(model)
        shard_weights(model, sharding)
    check_memory(model, max(lengths), chunk_size=chunk_size, reuse=reuse, ranks=sharding.size if sharding else 1)
    return model_dir, model, tokenizer, model_name


def _refuse_self_extend(model_dir: Path) -> None:
    from longctx.models.output import read_json
    from longctx.models.self_extend import attention_implementation

    if attention_implementation(read_json(Path(model_dir) / "config.json")) is not None:
        raise LongctxError(f"--sequence-parallel cannot run Self-Extend's grouped-position attention ({model_dir} asks "
                           "for it) across ranks; evaluate this model in one process (drop --sequence-parallel)")


def write_atomically(path: Path, text: str) -> None:
    """Write text to a temporary name beside path and rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_summary(output: Path, summary: dict) -> None:
    """summary.json and heatmap.png, each written to a temporary name and renamed into place."""
    write_atomically(output / SUMMARY, json.dumps(summary, indent=2) + "\n")
    scores = {(L, d): summary["per_cell"][f"{L}@{d:g}"] for L in summary["lengths"] for d in summary["depths"]}
    scores = {cell: value for cell, value in scores.items() if value is not None}
    temporary = output / ("heatmap.tmp.png")
    plot_heatmap(scores, temporary, title=heatmap_title(summary), lengths=summary["lengths"], depths=summary["depths"])
    os.replace(temporary, output / HEATMAP)
