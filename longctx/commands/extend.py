"""`longctx extend`: write a model directory with rope settings for a longer context."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longctx.commands._args import add_allow_pickle_argument, add_output_arguments, formatter
from longctx.commands.plan import add_model_target_method_arguments
from longctx.errors import LongctxError
from longctx.rope.planner import METHODS
from longctx.rope.self_extend import SELF_EXTEND
from longctx.units import format_bytes

DESCRIPTION = """\
Write a copy of a model whose config extends its context to --target-len tokens: the new
rope parameters and max_position_embeddings in config.json (transformers v5
rope_parameters), model_max_length in tokenizer_config.json, and longctx.json recording
the method, its parameters, the source model and its original length (train,
extract-lora and merge-adapters read it). Weight shards are hard-linked (copied across
filesystems): nothing else is rewritten, so an 8B model extends in seconds. The output
loads with AutoModelForCausalLM as is. Do not save over the output in place: its shards
are the source model's files.

The default method is ntk (a plain rope_theta; see `longctx plan --help` for every method
and why ntk is the default); run `longctx plan` first to see the parameters and a
fine-tuning schedule. yarn's attention temperature sharpens attention at every length:
on small models pass --attention-factor 1 to keep short prompts intact.

dynamic follows transformers' convention: max_position_embeddings stays the original
length and the base grows with the sequence at inference time.

Without training, use --method ntk --self-extend: of the training-free methods it measured
best on the default model (benchmarks/RESULTS.md, docs/rope.md). --method self-extend keeps the rope and asks for grouped-position
attention (Self-Extend: exact positions inside a --window of neighbours, positions divided
by --group-size beyond it); --self-extend adds the same on top of a static rope method. G
and W default to Self-Extend's rule, (native - W) * G + W >= --target-len with W = native / 8,
and go into config.json ("self_extend") and longctx.json. longctx needle, ppl and train
load such a model with attn_implementation="longctx_self_extend" by themselves; in your own
code, `import longctx` and pass that attn_implementation to from_pretrained (docs/rope.md)."""

EPILOG = """\
examples:
  longctx extend --target-len 32k --output out/smollm2-32k
  longctx extend --target-len 32k --method yarn --output out/smollm2-32k-yarn
  longctx extend --model llama-3-8b/ --target-len 1M --method scaling-law --output out/llama3-1m
  longctx extend --model llama-2-7b/ --target-len 64k --method ntk --rope-theta 1e6 --output out/l2-64k
  longctx extend --model llama-2-7b/ --target-len 128k --method yarn --factor 32 --beta-fast 32 --output out/l2-yarn
  longctx extend --target-len 32k --method yarn --output out/smollm2-32k --train configs/smollm2-135m-32k.yaml
  longctx extend --target-len 16k --method ntk --self-extend --output out/smollm2-16k-se
  longctx extend --target-len 32k --method self-extend --group-size 5 --window 1024 --output out/smollm2-32k-se
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extend",
        help="write a model with rope settings for a longer context (config only, weights linked)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    add_model_target_method_arguments(parser, methods=METHODS + (SELF_EXTEND,))
    parser.add_argument("--factor", type=float, metavar="F",
                        help="scale factor instead of target / native length (not for scaling-law)")
    parser.add_argument("--rope-theta", type=float, metavar="T",
                        help="ntk, scaling-law: the rope_theta to write instead of the formula's; "
                        "other methods: the base theta they scale")
    add_output_arguments(parser)
    parser.add_argument("--force", action="store_true", help="write even if --target-len is not beyond the model's length")
    add_allow_pickle_argument(parser)
    parser.add_argument("--train", metavar="FILE", help="after extending, fine-tune with this training config (YAML)")
    method_options = parser.add_argument_group("method options (yarn, llama3)")
    method_options.add_argument("--beta-fast", type=float, metavar="B", help="yarn: rotations where extrapolation stops (transformers default 32)")
    method_options.add_argument("--beta-slow", type=float, metavar="B", help="yarn: rotations where interpolation starts (transformers default 1)")
    method_options.add_argument("--attention-factor", type=float, metavar="A", help="yarn: cos/sin scale (default 0.1 ln(factor) + 1)")
    method_options.add_argument("--mscale", type=float, metavar="M", help="yarn: DeepSeek-style mscale (with --mscale-all-dim)")
    method_options.add_argument("--mscale-all-dim", type=float, metavar="M", help="yarn: DeepSeek-style mscale_all_dim")
    method_options.add_argument("--no-truncate", dest="truncate", action="store_const", const=False, default=None,
                                help="yarn: do not round the correction range to whole dimensions")
    method_options.add_argument("--low-freq-factor", type=float, metavar="L", help="llama3: default 1")
    method_options.add_argument("--high-freq-factor", type=float, metavar="H", help="llama3: default 4")
    grouped = parser.add_argument_group("grouped-position attention (Self-Extend)")
    grouped.add_argument("--self-extend", action="store_true", help="add grouped-position attention on top of --method")
    grouped.add_argument("--group-size", type=int, metavar="G", help="positions beyond the window are divided by G (default: the rule)")
    grouped.add_argument("--window", type=int, metavar="W", help="neighbour window with exact positions (default: native / 8)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longctx.models import check_output_free, resolve_model
    from longctx.models.extend import extend_model
    from longctx.models.reference import reference_path
    from longctx.rope.planner import OPTIONS, describe_rope

    start = time.perf_counter()
    inputs = {"the model": reference_path(args.model), "the training config": args.train and Path(args.train)}
    check_output_free(args.output, args.overwrite, inputs=inputs)  # before a possible first-time model conversion
    training = None
    if args.train:  # the whole training run is checked before anything is written
        if not Path(args.train).is_file():
            raise LongctxError(f"training config {args.train} not found; give an existing YAML file to --train")
        from longctx.train.api import prepare_after_extend

        training = prepare_after_extend(Path(args.output), Path(args.train), overwrite=args.overwrite)
    self_extend = None
    if args.method == SELF_EXTEND and args.self_extend:
        raise LongctxError("--self-extend adds grouped attention to a rope method; with --method self-extend drop it")
    if args.method == SELF_EXTEND or args.self_extend:
        self_extend = {"group_size": args.group_size, "window": args.window}
    elif args.group_size is not None or args.window is not None:
        raise LongctxError("--group-size and --window apply to Self-Extend; add --self-extend or use --method self-extend")
    if training is not None and self_extend is not None and training[0].parallel.sequence_parallel > 1:
        raise LongctxError("Self-Extend's attention cannot be sharded by sequence parallelism; train with "
                           "parallel.sequence_parallel 1, or extend without Self-Extend")
    model_dir = resolve_model(args.model)
    if training is not None:
        from longctx.models import read_json
        from longctx.train.config import check_parallel_fits_model

        check_parallel_fits_model(training[0].parallel, read_json(model_dir / "config.json"), str(args.model))
    result = extend_model(
        model_dir,
        args.output,
        args.target_len,
        args.method,
        source_model=str(args.model),
        overwrite=args.overwrite,
        force=args.force,
        allow_pickle=args.allow_pickle,
        self_extend=self_extend,
        **{name: getattr(args, name) for name in OPTIONS},
    )
    elapsed = time.perf_counter() - start
    how = "hard-linked" if not result.copied else ("copied" if not result.linked else f"{result.linked} linked, {result.copied} copied")
    print(f"extended {args.model} from {result.native_len} to {result.target_len} tokens in {elapsed:.2f} s -> {result.output}")
    print(f"  before:  {describe_rope(result.source)}, max_position_embeddings {result.source['max_position_embeddings']}")
    print(f"  method:  {args.method}: {describe_rope(result.settings)}")
    print(f"  config:  rope_parameters {json.dumps(result.settings['rope_parameters'])}, "
          f"max_position_embeddings {result.settings['max_position_embeddings']}")
    if result.self_extend:
        print(f"  grouped: Self-Extend {json.dumps(result.self_extend)}: "
              f"attn_implementation=\"longctx_self_extend\"")
    print(f"  weights: {len(result.weight_files)} file(s), {format_bytes(result.weight_bytes)}, {how}")
    print(f"  carried: {', '.join(result.carried) or 'no tokenizer or generation files found'}")
    print(f"  record:  {result.output / 'longctx.json'}")
    if not args.train:
        print(f"next: longctx needle --model {result.output}   (or fine-tune: longctx train, see `longctx plan`)")
        return 0
    from longctx.train.api import run_training

    trained = run_training(*training, overwrite=args.overwrite)
    print(f"trained model: {trained}")
    return 0
