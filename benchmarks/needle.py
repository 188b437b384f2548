"""Needle grid throughput: haystack-prefix KV reuse vs from-scratch prefill, and teacher forcing vs generation.

The same passkey grid (noise haystack, the raw passkey prompt, the default model unless --model
or --random-llama-layers says otherwise) is run up to four ways:
  reuse            prefix KV cache reused across depths and lengths, greedy generation (longctx's default)
  scratch          every prompt prefilled from scratch (--no-prefix-reuse; what gkamradt/RULER/EasyContext do)
  teacher          prefix reuse + one teacher-forced pass per cell instead of generation (EasyContext's scoring)
  scratch-teacher  from scratch + teacher forcing: with `teacher`, the prefill work alone, no decode step
and prints cells/hour, the speed-up of reuse over scratch against two bounds, and whether the
scores are identical:
  token bound  the issue's: prefill work falls from D full prompts per length to about
               1 + sum(1 - d) prompts; with several lengths on one haystack, to
               L_max + sum_L L * sum_d (1 - d) tokens
  FLOP bound   the same count weighted by what a token costs: a token at position p costs the
               dense layers plus attention over p keys, so the tokens after the needle, which
               reuse still has to process, are the dearest ones. This is the most an exact
               prefix reuse can save on the model; the smaller attention's share of a token's
               cost, the closer it comes to the token bound.

--random-llama-layers K measures on random weights of Llama-3.2-1B's layer shape (hidden 2048,
32 / 8 heads, MLP 8192; K layers, the default model's tokenizer, float32). The speed-up does not
depend on the number of layers, so a few stand in for all 16: attention is a smaller share of a
token's cost there than in the 135M default, which tells the harness's overhead apart from the
model's. Random weights answer nothing: run the teacher parts.

Each part is resumable (results in --results, one JSON line per cell; use one file per model)
so the parts can be run in separate short invocations (one torch thread by default: on a shared
machine, CPU time of one thread is the steadiest measure; wall time is printed too). With
--repeat N each part runs N times and the report takes each cell's best time:
    .venv/bin/python benchmarks/needle.py --part reuse --repeat 3
    .venv/bin/python benchmarks/needle.py --part scratch --repeat 3
    .venv/bin/python benchmarks/needle.py --part teacher --part scratch-teacher
    .venv/bin/python benchmarks/needle.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
PARTS = {
    "reuse": (True, "generate"),
    "scratch": (False, "generate"),
    "teacher": (True, "teacher-forced"),
    "scratch-teacher": (False, "teacher-forced"),
}
COMPARISONS = (("reuse", "scratch", "generation"), ("teacher", "scratch-teacher", "prefill alone (teacher-forced)"))
LENGTHS = (1024, 2048, 4096)
DEPTHS = tuple(float(d) for d in range(0, 101, 10))  # 11 depths


def run_part(part: str, model_ref: str, results: Path, lengths, depths, threads: int, repeat: int = 0) -> None:
    import torch

    from longctx.eval import Evaluator
    from longctx.tasks.retrieval import Task
    from longctx.models import load_model_and_tokenizer

    def this_run(row):
        return row["part"] == part and row.get("repeat", 0) == repeat

    done = {(r["length"], r["depth"]) for r in read_jsonl(results) if this_run(r)}
    todo = [(L, d) for L in lengths for d in depths if (L, d) not in done]
    if not todo:
        return
    if done:  # a resumed part would not pay for its prefix again: start the part over for honest timings
        rows = [r for r in read_jsonl(results) if not this_run(r)]
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
        todo = [(L, d) for L in lengths for d in depths]
    torch.set_num_threads(threads)
    model, tokenizer = load_model_and_tokenizer(model_ref)
    reuse, scoring = PARTS[part]
    evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=max(lengths), prefix_reuse=reuse, scoring=scoring)
    for length, depth in todo:
        clean_before = evaluator.prefix.tokens_processed
        started, cpu_started = time.perf_counter(), time.process_time()
        cell = evaluator.evaluate(length, depth)
        row = dict(part=part, repeat=repeat, length=length, depth=depth, score=cell.score, answer=cell.answer,
                   seconds=round(time.perf_counter() - started, 3),
                   cpu_seconds=round(time.process_time() - cpu_started, 3),
                   tokens=cell.processed_tokens + evaluator.prefix.tokens_processed - clean_before)
        with results.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def prefill_flops_per_position(config) -> tuple[float, float]:
    """(dense, attention): a prompt token at position p costs dense + attention * p FLOPs in a
    forward pass (matmuls only; logits are computed for the last token alone)."""
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inner = config.hidden_size, config.intermediate_size
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inner
    return 2.0 * layers * projections, 4.0 * layers * heads * head_dim


def prefill_work(start: float, end: float, dense: float, attention: float) -> float:
    """FLOPs of processing positions start..end on top of a cache of the first `start`."""
    return dense * (end - start) + attention * (end * end - start * start) / 2


def bounds(lengths, depths, config=None) -> dict[str, tuple[float, float]]:
    """{name: (scratch work, reuse work)} for the token and (with a config) the FLOP bound."""
    fractions = [d / 100 for d in depths]
    costs = {"token": (1.0, 0.0)}
    if config is not None:
        costs["FLOP"] = prefill_flops_per_position(config)
    result = {}
    for name, (dense, attention) in costs.items():
        scratch = sum(prefill_work(0, L, dense, attention) for L in lengths for _ in depths)
        reuse = prefill_work(0, max(lengths), dense, attention) + sum(
            prefill_work(d * L, L, dense, attention) for L in lengths for d in fractions
        )
        result[name] = (scratch, reuse)
    return result


def best_per_cell(rows: list[dict]) -> list[dict]:
    """One row per cell with the least wall and CPU time over repeated runs (timeit's rule: noise
    only ever adds time). Repeats must agree on everything but time."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        key = (row["length"], row["depth"])
        if key not in cells:
            cells[key] = dict(row)
            continue
        best = cells[key]
        if (best["score"], best["answer"], best["tokens"]) != (row["score"], row["answer"], row["tokens"]):
            raise SystemExit(f"repeated runs of {row['part']} disagree at {key}: {best['answer']!r} vs {row['answer']!r}")
        for clock in ("seconds", "cpu_seconds"):
            best[clock] = min(best[clock], row[clock])
    return list(cells.values())


def report(results: Path, model_ref: str, lengths, depths) -> str:
    from transformers import AutoConfig

    from longctx.models import resolve_model

    rows = read_jsonl(results)
    by_part = {part: best_per_cell([r for r in rows if r["part"] == part]) for part in PARTS}
    repeats = len({r.get("repeat", 0) for r in rows})
    cells = len(lengths) * len(depths)
    work = bounds(lengths, depths, AutoConfig.from_pretrained(resolve_model(model_ref)))
    scratch_work, reuse_work = work["token"]
    bound = scratch_work / reuse_work
    flop_bound = work["FLOP"][0] / work["FLOP"][1]
    lines = [
        f"model: {model_ref}",
        f"grid: passkey, lengths {list(lengths)}, {len(depths)} depths (0-100), 1 sample per cell = {cells} cells",
        f"times: per cell, the best of {repeats} run(s) of each part",
        f"token bound {bound:.2f}x ({scratch_work:.0f} / {reuse_work:.0f} tokens), "
        f"FLOP bound {flop_bound:.2f}x (attention over earlier positions included)",
        "",
        "| run | cells done | wall s | CPU s | cells/hour (wall) | prompt tokens processed | mean score |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = {}
    for part, part_rows in by_part.items():
        if not part_rows:
            continue
        seconds = sum(r["seconds"] for r in part_rows)
        cpu = sum(r.get("cpu_seconds", float("nan")) for r in part_rows)
        tokens = sum(r["tokens"] for r in part_rows)
        totals[part] = dict(wall=seconds, cpu=cpu, tokens=tokens, cells=len(part_rows))
        mean = sum(r["score"] for r in part_rows) / len(part_rows)
        lines.append(f"| {part} | {len(part_rows)} | {seconds:.0f} | {cpu:.0f} | {3600 * len(part_rows) / seconds:.0f} "
                     f"| {tokens} | {mean:.3f} |")

    def complete(*parts):
        return all(part in totals and totals[part]["cells"] == cells for part in parts)

    def answers(part):
        return {(r["length"], r["depth"]): (r["score"], r["answer"]) for r in by_part[part]}

    for reused, scratch, what in COMPARISONS:
        if not complete(reused, scratch):
            continue
        lines += ["", f"{reused} vs {scratch}, {what}: "
                      f"{totals[scratch]['tokens'] / totals[reused]['tokens']:.2f}x fewer prompt tokens with reuse"]
        for clock in ("wall", "cpu"):
            speedup = totals[scratch][clock] / totals[reused][clock]
            lines.append(f"  {clock} time: {speedup:.2f}x faster = {100 * speedup / bound:.0f}% of the token bound, "
                         f"{100 * speedup / flop_bound:.0f}% of the FLOP bound")
        lines.append(f"  scores and answers identical: {answers(reused) == answers(scratch)}")
    if complete("reuse", "teacher"):
        teacher_scores = {key: score for key, (score, _) in answers("teacher").items()}
        agree = sum(teacher_scores[key] == score for key, (score, _) in answers("reuse").items())
        lines += ["", (
            f"teacher-forced vs generation: {totals['reuse']['wall'] / totals['teacher']['wall']:.2f}x faster (wall), "
            f"{totals['reuse']['cpu'] / totals['teacher']['cpu']:.2f}x (CPU); same score in {agree}/{cells} cells"
        )]
    return "\n".join(lines)


def random_llama(layers: int) -> str:
    """A directory with random weights of Llama-3.2-1B's layer shape and the default model's tokenizer."""
    from common import LLAMA_32_1B, write_random_llama

    from longctx.models import read_json, resolve_model

    default_dir = resolve_model("smollm2-135m")
    tokens = {key: read_json(default_dir / "config.json")[key] for key in ("vocab_size", "bos_token_id", "eos_token_id")}
    config = {**LLAMA_32_1B, **tokens, "num_hidden_layers": layers, "dtype": "float32"}
    directory = ROOT / "out" / "needle-bench-models" / f"llama-3.2-1b-shaped-{layers}l-random"
    return str(write_random_llama(directory, config, tokenizer_source=default_dir))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=list(PARTS), action="append", help="run these parts (default: all)")
    parser.add_argument("--report", action="store_true", help="only print the report")
    parser.add_argument("--model", default="smollm2-135m", help="model name or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--random-llama-layers", type=int, metavar="K",
                        help="instead of --model: random weights of Llama-3.2-1B's layer shape with K layers")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each part; the report takes each cell's best time (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine one thread's CPU time is the steadiest measure)")
    parser.add_argument("--results", type=Path, default=ROOT / "out" / "needle-bench" / "results.jsonl")
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    model_ref = random_llama(args.random_llama_layers) if args.random_llama_layers else args.model
    if not args.report:
        for repeat in range(args.repeat):
            for part in args.part or list(PARTS):
                run_part(part, model_ref, args.results, LENGTHS, DEPTHS, args.threads, repeat)
    print(report(args.results, model_ref, LENGTHS, DEPTHS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
