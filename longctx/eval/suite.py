"""RULER's suite run: tasks x lengths x samples, resumable, with RULER's table and effective length.

The tasks, their templates and prompts are longctx/tasks/ruler.py's. Each sample is answered
greedily through the needle grid's engine (eval/engine.py) with RULER's generation length, and
the whole generation is scored (RULER reads every generated line, not the first). For the
needle tasks, whose prompts all start with the same haystack, the KV cache of that prefix is
computed once per task and length and reused by every sample (exact with static rope).

Output directory, as the needle grid's (eval/grid.py):
- settings.json: model, suite, prompt style, seed, QA data; `--resume` refuses other settings;
- results.jsonl: one line per sample, appended and fsync'ed as it finishes (task, length, sample,
  answer, expected, score 0-1, prompt and processed tokens, seconds);
- summary.json: RULER's table (per task and length, in points out of 100), the average row, the
  effective length, what was skipped;
- heatmap.png: task x length, the scores in points.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longctx.errors import LongctxError
from longctx.eval.engine import (
    DEFAULT_CHUNK,
    PrefixCache,
    evaluation_mode,
    greedy_answer,
    prefix_reuse_supported,
)
from longctx.eval.grid import HEATMAP, RESULTS, SUMMARY, append_result, load_for_run, start_results, write_atomically
from longctx.eval.heatmap import plot_heatmap
from longctx.eval.scoring import ruler_postprocess, ruler_score
from longctx.tasks.haystacks import encode
from longctx.tasks.prompts import detect_style
from longctx.tasks.ruler import (
    QA_TASKS,
    RULER_TASKS,
    FittedPrompt,
    clean_prompt_ids,
    fit_prompt,
    load_qa_data,
    make_generator,
)
from longctx.units import length_label

log = logging.getLogger(__name__)

SUITES = ("ruler",)
DEFAULT_SUITE_THRESHOLD = 0.856  # RULER's: Llama-2-7B's average at 4K, 85.6 points


@dataclass
class SuiteSettings:
    """The settings a sample's result depends on (resuming requires the same ones)."""

    model: str
    suite: str = "ruler"
    prompt: str = "auto"
    seed: int = 0
    qa_data: str | None = None


@dataclass
class SuitePlan:
    """Which tasks, lengths and samples to run. `tasks=None`: all 13, or the 11 synthetic ones without
    QA data. Tasks, lengths and samples may change on --resume; finished samples are kept."""

    lengths: list[int]
    tasks: list[str] | None = None
    samples: int = 1
    prefix_reuse: bool = True
    chunk_size: int = DEFAULT_CHUNK
    threshold: float = DEFAULT_SUITE_THRESHOLD
    qa_data: str | None = None
    device: str = "cpu"  # where the model runs (the scores do not depend on it)
    sequence_parallel: int = 1  # processes the KV caches are sharded over (torchrun's world size)
    skipped: list[str] = field(init=False)
    cells: list[tuple[str, int, int]] = field(init=False)

    def __post_init__(self):
        if not self.lengths or any(length <= 0 for length in self.lengths):
            raise LongctxError("the suite needs positive --lengths, e.g. --lengths 4k,8k,16k,32k")
        if self.samples < 1:
            raise LongctxError("--samples must be at least 1")
        if self.chunk_size < 1:
            raise LongctxError("--chunk-size must be a positive number of tokens")
        if not 0.0 < self.threshold <= 1.0:
            raise LongctxError(f"--threshold {self.threshold} is outside (0, 1]; give a fraction (RULER's 85.6 is 0.856)")
        unknown = [name for name in self.tasks or [] if name not in RULER_TASKS]
        if unknown:
            raise LongctxError(f"unknown RULER task(s) {', '.join(unknown)}: choose from {', '.join(RULER_TASKS)}")
        if self.tasks is None:
            self.tasks = [name for name in RULER_TASKS if self.qa_data is not None or name not in QA_TASKS]
        self.skipped = [name for name in QA_TASKS if name not in self.tasks and self.qa_data is None]
        missing = [name for name in self.tasks if name in QA_TASKS and self.qa_data is None]
        if missing:
            raise LongctxError(f"{', '.join(missing)} need QA data: pass --qa-data DIR holding squad.json and hotpotqa.json")
        self.tasks = [name for name in RULER_TASKS if name in self.tasks]  # RULER's order, no repeats
        self.lengths = sorted(set(self.lengths))
        self.cells = [(name, length, i) for length in self.lengths for name in self.tasks for i in range(self.samples)]


def cell_key(row: dict) -> tuple[str, int, int]:
    return str(row["task"]), int(row["length"]), int(row["sample"])


def summarize_suite(rows: list[dict], plan: SuitePlan, model_name: str, seconds: float = 0.0) -> dict:
    """RULER's table: each task's mean score per length in points (0-100), the average of the tasks
    per length (once every task has a sample there), and the effective length: the longest length up to which every average is at least
    the threshold (0 when the shortest length already falls below it)."""
    wanted = set(plan.cells)
    rows = [row for row in rows if cell_key(row) in wanted]

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    scores = {}
    for name in plan.tasks:
        per_length = {L: mean(100 * r["score"] for r in rows if r["task"] == name and r["length"] == L) for L in plan.lengths}
        scores[name] = per_length
    # the average of every task, or none while a task has no sample at that length (a partial run)
    average = {L: mean(scores[name][L] for name in plan.tasks) if all(scores[name][L] is not None for name in plan.tasks)
               else None for L in plan.lengths}
    effective = 0
    for L in plan.lengths:
        if average[L] is None or average[L] < 100 * plan.threshold - 1e-9:
            break
        effective = L

    def points(value):
        return None if value is None else round(value, 2)

    return {
        "suite": "ruler",
        "model": model_name,
        "tasks": plan.tasks,
        "lengths": plan.lengths,
        "scores": {name: {str(L): points(scores[name][L]) for L in plan.lengths} for name in plan.tasks},
        "average": {str(L): points(average[L]) for L in plan.lengths},
        "effective_length": effective,
        "threshold": plan.threshold,
        "skipped": plan.skipped,
        "samples_per_cell": plan.samples,
        "samples_done": len(rows),
        "samples_planned": len(plan.cells),
        "prefix_reuse": plan.prefix_reuse,
        "seconds": round(seconds, 1),
    }


def format_suite_table(summary: dict) -> str:
    """One row per task, one column per length (points out of 100), the average row, the effective length."""
    lengths, tasks = summary["lengths"], summary["tasks"]
    width = max(len(name) for name in tasks + ["average (13)"])
    header = f"{'task':<{width}} | " + " | ".join(f"{length_label(L):>6}" for L in lengths)

    def row(label, values):
        return f"{label:<{width}} | " + " | ".join(f"{v:6.1f}" if v is not None else "     -" for v in values)

    lines = [header, "-" * len(header)]
    lines += [row(name, [summary["scores"][name][str(L)] for L in lengths]) for name in tasks]
    lines += ["-" * len(header), row(f"average ({len(tasks)})", [summary["average"][str(L)] for L in lengths])]
    effective = summary["effective_length"]
    lines.append(
        f"effective length {length_label(effective) if effective else 'none'} "
        f"(average >= {100 * summary['threshold']:g}, lengths up to it all pass)"
    )
    if summary["skipped"]:
        lines.append(f"skipped: {', '.join(summary['skipped'])} (no --qa-data); the average is over {len(tasks)} tasks, "
                     "not RULER's 13")
    return "\n".join(lines)


def write_suite_summary(output: Path, summary: dict) -> None:
    """summary.json and heatmap.png (tasks and the average x lengths), each renamed into place."""
    write_atomically(output / SUMMARY, json.dumps(summary, indent=2) + "\n")
    labels = summary["tasks"] + ["average"]
    table = {**summary["scores"], "average": summary["average"]}
    scores = {(L, row): table[name][str(L)] / 100 for row, name in enumerate(labels) for L in summary["lengths"]
              if table[name][str(L)] is not None}
    effective = summary["effective_length"]
    title = (
        f"{summary['model']}\nRULER, {summary.get('prompt_style', '')} prompt, {summary['samples_per_cell']} sample(s)/cell, "
        f"effective length {length_label(effective) if effective else 'none'} (average >= {100 * summary['threshold']:g})"
    )
    temporary = output / "heatmap.tmp.png"
    plot_heatmap(scores, temporary, title=title, lengths=summary["lengths"], depths=list(range(len(labels))),
                 row_labels=labels, ylabel="Task", percent=True)
    temporary.replace(output / HEATMAP)


def run_suite(
    settings: SuiteSettings, plan: SuitePlan, output: str | Path, *, resume: bool = False, overwrite: bool = False,
    progress: bool = True, allow_pickle: bool = False,
) -> dict | None:
    """Run (or resume) the suite, writing each sample's result as it finishes; returns the summary.

    With plan.sequence_parallel P > 1 this is one of P torchrun processes, as in the needle grid
    (eval/grid.py run_grid): every rank answers every sample with its share of the KV caches, and
    rank 0 alone checks and writes the output and returns the summary (the others return None)."""
    from tqdm import tqdm

    from longctx.eval.sharded import joined, on_every_rank
    from longctx.models import resolve_device

    output = Path(output)
    if settings.suite not in SUITES:
        raise LongctxError(f"unknown suite {settings.suite!r}: choose one of {', '.join(SUITES)}")
    with joined(plan.sequence_parallel, resolve_device(plan.device)) as sharding:
        main = sharding is None or sharding.rank == 0
        model_dir, model, tokenizer, model_name, qa, style = on_every_rank(
            sharding, lambda: _suite_model(settings, plan, output, resume, overwrite, allow_pickle, sharding))
        static_rope = prefix_reuse_supported(model.config)
        reuse = plan.prefix_reuse and static_rope
        if plan.prefix_reuse and not reuse:
            log.warning("this model's rope depends on the sequence length: every prompt is prefilled from scratch")
        if plan.skipped and main:
            log.warning("QA skipped (%s): no --qa-data", ", ".join(plan.skipped))

        rows, todo = start_results(output, settings, plan.cells, cell_key, resume=resume, overwrite=overwrite,
                                   sharding=sharding)
        started = time.perf_counter()
        bar = tqdm(total=len(todo), desc="ruler", unit="sample", disable=not progress or not main or not todo)
        for length in plan.lengths:
            for name in plan.tasks:
                indices = [i for task, L, i in todo if task == name and L == length]
                if not indices:
                    continue
                generator = make_generator(tokenizer, name, length=length, seed=settings.seed, qa_data=qa.get(name))
                prefix = None
                for index in indices:
                    fitted = fit_prompt(tokenizer, generator, index, style)
                    if prefix is None:  # one reused haystack prefix per task and length
                        clean = clean_prompt_ids(tokenizer, generator, fitted.size, style) if reuse else None
                        prefix = PrefixCache(model, clean or [], enabled=clean is not None, chunk_size=plan.chunk_size,
                                             sharding=sharding)
                    with evaluation_mode(model, sharding):
                        row = evaluate_sample(model, tokenizer, prefix, fitted, draft=static_rope)
                    row.update(length=length, sample=index)
                    if main:
                        append_result(output / RESULTS, row)
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix_str(f"L={length_label(length)} {name} score={row['score']:.2f}")
        bar.close()
        if not main:
            return None
        summary = summarize_suite(rows, plan, model_name, time.perf_counter() - started)
        summary.update(prompt_style=style, model_path=str(model_dir), settings=asdict(settings),
                       answer="the whole greedy generation, up to the task's tokens_to_generate, until end of sequence "
                              "or until no more text can change the score")
        write_suite_summary(output, summary)
        return summary


def _suite_model(settings, plan, output, resume, overwrite, allow_pickle, sharding):
    """(model directory, model, tokenizer, model name, QA data, prompt style) after every check the
    suite makes before its first write."""
    qa = {name: load_qa_data(settings.qa_data, RULER_TASKS[name].dataset) for name in plan.tasks if name in QA_TASKS}
    model_dir, model, tokenizer, model_name = load_for_run(
        settings, output, {"the QA data": settings.qa_data}, lengths=plan.lengths, chunk_size=plan.chunk_size,
        reuse=plan.prefix_reuse, resume=resume, overwrite=overwrite, allow_pickle=allow_pickle,
        device=plan.device, sharding=sharding,
    )
    style = detect_style(tokenizer, settings.prompt)
    for name in plan.tasks:  # refuse a length too short for a task before writing anything
        shortest = make_generator(tokenizer, name, length=min(plan.lengths), seed=settings.seed, qa_data=qa.get(name))
        fit_prompt(tokenizer, shortest, 0, style)
    return model_dir, model, tokenizer, model_name, qa, style


def evaluate_sample(model, tokenizer, prefix: PrefixCache, fitted: FittedPrompt, *, draft: bool = True) -> dict:
    """One sample answered greedily (up to the task's tokens_to_generate) and scored by its RULER metric;
    `draft`: the sample's right answer rides along in the prompt's pass (static rope only)."""
    started = time.perf_counter()
    sample, ids = fitted.sample, fitted.ids
    task = RULER_TASKS[sample.task]
    shared = prefix.shared_with(ids) if prefix.enabled else 0
    answer = greedy_answer(
        model, tokenizer, prefix, ids, shared, task.tokens_to_generate,
        settled=lambda text: ruler_score(sample.metric, ruler_postprocess(text), sample.expected) == 1.0,
        draft=encode(tokenizer, sample.draft) if draft else (), first_line=False,
    )
    prediction = ruler_postprocess(answer.text)
    return {
        "task": sample.task,
        "answer": prediction,
        "expected": sample.expected,
        "score": ruler_score(sample.metric, prediction, sample.expected),
        "seconds": round(time.perf_counter() - started, 3),
        "prompt_tokens": len(ids),
        "haystack_size": fitted.size,
        "shared_prefix": shared,
        "processed_tokens": answer.new_tokens,
    }
