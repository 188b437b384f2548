"""`longctx plan`: rope parameters for a target length and a progressive fine-tuning schedule."""

from __future__ import annotations

import argparse
import json

from longctx.commands._args import add_model_argument, formatter, token_count
from longctx.rope.methods import ROPE_METHODS
from longctx.rope.planner import DEFAULT_METHOD, METHODS
from longctx.units import format_token_total

METHOD_LINES = "\n".join(
    f"  {name:<12} {ROPE_METHODS[name].summary}" + (" (default)" if name == DEFAULT_METHOD else "") for name in METHODS
)

DESCRIPTION = """\
Show the rope parameters that extend a model to --target-len tokens, and a progressive
fine-tuning schedule that reaches it (stage lengths, rope parameters per stage, suggested
steps and tokens). Only the model's config.json is read: no weights are needed.

Methods:
""" + METHOD_LINES + """

The default is ntk: the config stays a plain rope_theta that every runtime and merge path
reads, a KV cache stays valid at every length (unlike dynamic), short prompts keep working
(YaRN's attention temperature degrades them on small models), and on the default model it
measured best of the static methods without training. For progressive training to 256K
and beyond use scaling-law: it reproduces the rope_theta of Gradient's released 262K and
1M Llama-3-8B configs.

Stages (--stages auto): walking down from the target by 2x, 2x, 4x, then 8x while a stage
is still at least twice the native length (8K -> 1M gives 65K, 262K, 524K, 1048K, as
Gradient trained Llama-3-8B). --stages K gives K stages growing by the same ratio. Steps
and tokens follow EasyContext: about 1M tokens per step, 200 steps per stage, lr 2e-5."""

EPILOG = """\
examples:
  longctx plan --target-len 32k
  longctx plan --model meta-llama-3-8b/ --target-len 1M --method scaling-law
  longctx plan --model meta-llama-3-8b/ --target-len 1M --method scaling-law --json > plan.json
  longctx plan --model llama-2-7b/ --target-len 128k --method yarn --stages 3 --steps-per-stage 400
  longctx plan --target-len 32k --method yarn --json
"""


def add_model_target_method_arguments(parser: argparse.ArgumentParser, methods: tuple[str, ...] = METHODS) -> None:
    """--model, --target-len and --method, as plan and extend take them."""
    add_model_argument(parser)
    parser.add_argument("--target-len", type=token_count, required=True, metavar="N",
                        help="context length to reach: 1048576, 1M, 1m, 128k, 128K")
    parser.add_argument("--method", choices=methods, default=DEFAULT_METHOD, help="scaling method (default: %(default)s)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="rope parameters and a progressive stage schedule for a target length",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    add_model_target_method_arguments(parser)
    parser.add_argument("--stages", default="auto", metavar="auto|K",
                        help="'auto' for the Gradient-like ladder, or a number of stages (default: %(default)s)")
    parser.add_argument("--steps-per-stage", type=int, default=200, metavar="N",
                        help="suggested optimizer steps per stage (default: %(default)s)")
    parser.add_argument("--tokens-per-step", type=token_count, default=2**20, metavar="N",
                        help="suggested tokens per optimizer step, rounded to whole sequences (default: 1M)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def format_plan(result, model: str) -> str:
    from longctx.rope.planner import describe_rope

    final = result.final
    lines = [
        f"model:  {model}",
        f"native: {result.native_len} tokens, {describe_rope(result.source)}",
        f"target: {result.target_len} tokens with {result.method}",
        "",
        "config.json at the target:",
        f"  rope_parameters: {json.dumps(final['rope_parameters'])}",
        f"  max_position_embeddings: {final['max_position_embeddings']}",
        "",
        f"progressive fine-tuning (constant learning rate {result.learning_rate:g}, each stage starts from the previous):",
    ]
    rows = [("stage", "seq_len", "rope", "steps", "tokens/step", "tokens")]
    for number, stage in enumerate(result.stages, 1):
        rows.append((str(number), str(stage.seq_len), describe_rope(stage.rope), str(stage.steps),
                     str(stage.tokens_per_step), format_token_total(stage.tokens)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [
        f"  total: {result.total_steps} steps, {format_token_total(result.total_tokens)} tokens",
        "",
        f"apply without training: longctx extend --model {model} --target-len {result.target_len} "
        f"--method {result.method} --output DIR",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from longctx.models import read_json, resolve_model
    from longctx.rope.planner import plan

    config = read_json(resolve_model(args.model) / "config.json")
    result = plan(
        config,
        args.target_len,
        args.method,
        stages=args.stages,
        steps_per_stage=args.steps_per_stage,
        tokens_per_step=args.tokens_per_step,
    )
    if args.json:
        print(json.dumps({"model": str(args.model), **result.to_dict()}, indent=2))
    else:
        print(format_plan(result, str(args.model)))
    return 0
