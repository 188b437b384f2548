"""`longctx extract-lora BASE EXTENDED`: the difference between two models as a PEFT LoRA adapter."""

from __future__ import annotations

import argparse

from longctx.commands._args import add_allow_pickle_argument, add_output_arguments, formatter
from longctx.lora.choices import EMBEDDING_POLICIES, VOCAB_POLICIES
from longctx.models.dtypes import DTYPE_NAMES
from longctx.units import format_bytes

DESCRIPTION = """\
Extract what EXTENDED (a long-context fine-tune) learned on top of BASE as a LoRA adapter,
so that `merge-adapters` can give the same ability to any sibling fine-tune of BASE.

Tensors are paired by name and streamed, a few pairs side by side on --workers threads
(peak memory is set by the largest matrix, not by the model or the worker count). Each changed linear layer's delta dW is factored as
B @ A by a randomized SVD (exact SVD when the rank is close to the matrix size), with
lora_alpha = r so PEFT's scaling is 1. The rank is fixed (--rank) or chosen per module as
the smallest keeping a fraction of dW's energy sum(s^2) (--energy, capped by --max-rank).
Embeddings and lm_head go to modules_to_save at full rank by default; changed norms too;
bias deltas become lora_B.bias. Unchanged modules are left out; anything changed that the
adapter cannot carry is listed as skipped.

Written to --output: adapter_config.json and adapter_model.safetensors (load them with
PeftModel.from_pretrained(base, DIR)), longctx.json (EXTENDED's rope_parameters and
max_position_embeddings, which merge-adapters applies to the merged config) and
extraction_report.json (per module: rank, retained energy, relative error ||dW-BA||/||dW||).
--engine mergekit runs mergekit-extract-lora instead and adds the same sidecar and report."""

EPILOG = """\
examples:
  longctx extract-lora llama-3-8b-instruct/ llama-3-8b-instruct-1m/ --output out/long-lora --rank 64
  longctx extract-lora BASE EXTENDED --output out/long-lora --energy 0.9 --max-rank 512
  longctx extract-lora BASE EXTENDED --output out/attn-lora --rank 128 --target-modules q_proj k_proj v_proj o_proj
  longctx extract-lora BASE EXTENDED --output out/long-lora --embeddings lora --dtype bfloat16 --device cuda
  longctx extract-lora BASE EXTENDED --output out/mk-lora --rank 32 --engine mergekit
  longctx merge-adapters --base_model_name_or_path OTHER --peft_model_paths out/long-lora --output_dir out/other-long
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract-lora",
        help="the difference between a base model and its long-context fine-tune as a LoRA adapter",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("base", metavar="BASE", help="the base model: directory, .gguf file, hub id or smollm2-135m")
    parser.add_argument("extended", metavar="EXTENDED", help="its fine-tune (same architecture) whose difference to extract")
    add_output_arguments(parser)
    rank = parser.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, metavar="R",
                      help="the same rank for every module (default: 64 when --energy is not given)")
    rank.add_argument("--energy", type=float, metavar="E",
                      help="per module, the smallest rank keeping this fraction of the delta's energy, in (0, 1], e.g. 0.9")
    parser.add_argument("--max-rank", type=int, metavar="R", help="cap on the rank chosen by --energy")
    parser.add_argument("--target-modules", nargs="+", metavar="NAME",
                        help="linear layers to decompose, by name or last name segment (default: every linear layer)")
    parser.add_argument("--embeddings", choices=EMBEDDING_POLICIES, default="full",
                        help="embeddings and lm_head: full-rank copies in modules_to_save, LoRA factors, "
                        "or left out (default: %(default)s)")
    parser.add_argument("--vocab-policy", choices=VOCAB_POLICIES, default="error",
                        help="when vocabulary sizes differ: stop, or keep BASE's vocabulary and drop EXTENDED's "
                        "extra rows (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="dtype of the LoRA factors; full-rank copies keep EXTENDED's dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda",
                        help="where the factorization runs (default: %(default)s)")
    parser.add_argument("--engine", choices=("longctx", "mergekit"), default="longctx",
                        help="longctx (streaming randomized SVD) or mergekit-extract-lora (its exact numbers) "
                        "(default: %(default)s)")
    add_allow_pickle_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD's sketch (default: %(default)s)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="tensor pairs read and factored side by side, each on one CPU thread; peak memory "
                        "stays that of the largest pair (default: the CPUs available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.engine == "mergekit":
        from longctx.lora.mergekit import extract_lora_with_mergekit as extract
    else:
        from longctx.lora.extract import extract_lora as extract

    report = extract(
        args.base, args.extended, args.output, overwrite=args.overwrite, show_progress=not args.no_progress,
        rank=args.rank, energy=args.energy, max_rank=args.max_rank, target_modules=args.target_modules,
        embeddings=args.embeddings, vocab_policy=args.vocab_policy, dtype=args.dtype, device=args.device,
        allow_pickle=args.allow_pickle, seed=args.seed, workers=args.workers,
    )
    print(format_summary(report))
    return 0


def format_timings(timings: dict) -> str:
    """One line: where the time went, phases in seconds summed over the workers."""
    phases = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in timings["phase_seconds"].items())
    return (f"  time: set-up {timings['setup_seconds']:.1f} s, tensor pass {timings['tensor_pass_seconds']:.1f} s on "
            f"{timings['workers']} worker(s) ({phases} s); read {format_bytes(timings['bytes_read'])} at "
            f"{timings['read_mb_per_second']:.0f} MB/s")


def format_summary(report: dict) -> str:
    summary = report["summary"]
    counts = summary["modules"]
    lora = counts["lora"] + counts["lora_embedding"]
    ranks = f"rank {summary['rank_min']}" if summary["rank_min"] == summary["rank_max"] else (
        f"ranks {summary['rank_min']}-{summary['rank_max']}, mean {summary['rank_mean']}")
    lines = [
        f"extract-lora ({report['engine']}): {lora} LoRA modules ({ranks}), {counts['modules_to_save']} full-rank "
        f"(modules_to_save), {counts['skipped']} skipped, {counts['unchanged']} unchanged",
        f"relative error ||dW - BA|| / ||dW||: mean {summary['relative_error_mean']:.3g}, "
        f"max {summary['relative_error_max']:.3g}",
    ]
    decomposed = [m for m in report["modules"] if m.get("relative_error") is not None]
    if decomposed:
        worst = max(decomposed, key=lambda m: m["relative_error"])
        lines.append(f"  worst: {worst['module']} (rank {worst['rank']}, error {worst['relative_error']:.3g})")
    skipped = [m for m in report["modules"] if m["kind"] == "skipped"]
    for module in skipped[:5]:
        lines.append(f"  skipped: {module['module']}: {module['reason']}")
    if len(skipped) > 5:
        lines.append(f"  ... {len(skipped) - 5} more skipped (see the report)")
    lines.append(f"adapter: {report['output']} ({format_bytes(summary['adapter_bytes'])}) in {summary['seconds']:.1f} s")
    if "timings" in summary:
        lines.append(format_timings(summary["timings"]))
    lines.append(f"report:  {report['output']}/extraction_report.json; rope settings of EXTENDED in longctx.json")
    return "\n".join(lines)
