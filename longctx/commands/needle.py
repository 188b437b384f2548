"""`longctx needle`: a needle-in-a-haystack grid (lengths x depths), scores, summary and heatmap."""

from __future__ import annotations

import argparse

from longctx.commands._args import add_allow_pickle_argument, add_model_argument, add_output_arguments, float_list, formatter, token_count, token_count_list

DESCRIPTION = """\
Hide a needle (a passkey, gkamradt's sentence, or RULER's magic keys and values) at each
depth of a haystack of each length, ask for it, and score the answer by string match.
Every prompt is exactly L tokens of the model's own tokenizer, template included. The KV
cache of the haystack prefix is computed once and reused for every depth and length, so
only the part of each prompt from the needle onwards is processed (exact with static rope
scaling; models with dynamic NTK are prefilled from scratch).

Writes results.jsonl (one line per sample, appended as it finishes: --resume continues an
interrupted run), summary.json (means per length and depth, effective length) and heatmap.png."""

EPILOG = """\
examples:
  # the classic passkey grid on the default model
  longctx needle --lengths 1k,2k,4k,8k --num-depths 5 --output out/needle
  # gkamradt's needle in prose, 11 sigmoid-spaced depths, 3 samples per cell
  longctx needle --model out/smollm2-32k --task needle --haystack essays \\
      --min-len 4k --max-len 32k --num-lengths 8 --num-depths 11 --depth-spacing sigmoid \\
      --samples 3 --output out/needle-32k
  # RULER's multi-key variant with uuid values, scored teacher-forced (one forward pass)
  longctx needle --task multikey --value-type uuids --scoring teacher-forced \\
      --lengths 2k,4k --depths 0,25,50,75,100 --output out/ruler-mk
  # a 64K grid whose KV cache is split across 4 processes (each holds a quarter)
  torchrun --nproc-per-node 4 -m longctx needle --model out/smollm2-64k --lengths 16k,32k,64k \
      --sequence-parallel 4 --output out/needle-64k
  # RULER's 13 tasks at four lengths, its table and effective length (QA from local SQuAD/HotpotQA files)
  longctx needle --suite ruler --lengths 4k,8k,16k,32k --samples 5 --qa-data data/ruler --output out/ruler
  # your own needle in your own documents; resume after an interruption
  longctx needle --task needle --haystack dir:docs/ --needle "The code word is lilac." \\
      --question "What is the code word?" --answer-prefix "The code word is" --answer "lilac" \\
      --lengths 4k --num-depths 11 --output out/mine --resume
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "needle", help="needle-in-a-haystack grid with a heatmap", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=formatter,
    )
    add_model_argument(parser)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lengths", type=token_count_list, metavar="L,L,...", help="context lengths, e.g. 1k,2k,4k,8k")
    grid.add_argument("--min-len", type=token_count, metavar="L", help="shortest length (with --max-len, --num-lengths)")
    grid.add_argument("--max-len", type=token_count, metavar="L", help="longest length")
    grid.add_argument("--num-lengths", type=int, default=4, metavar="N", help="lengths from --min-len to --max-len (default: %(default)s)")
    grid.add_argument("--depths", type=float_list, metavar="D,D,...", help="needle depths in percent, e.g. 0,25,50,75,100")
    grid.add_argument("--num-depths", type=int, default=5, metavar="N", help="depths from 0 to 100 (default: %(default)s)")
    grid.add_argument("--depth-spacing", choices=("linear", "sigmoid"), default="linear", help="spacing of --num-depths (default: %(default)s)")
    grid.add_argument("--samples", type=int, default=1, metavar="N", help="samples per cell, each with new needle values (default: %(default)s)")
    task = parser.add_argument_group("task")
    task.add_argument("--task", choices=("passkey", "reverse", "needle", "single", "multikey", "multivalue", "multiquery"), default="passkey",
                      help="what to hide: passkey, a list of digits to say backwards (reverse), gkamradt's needle, "
                      "or RULER's NIAH variants (default: %(default)s)")
    task.add_argument("--value-type", choices=("numbers", "words", "uuids"), default="numbers",
                      help="values of the RULER tasks (default: %(default)s)")
    task.add_argument("--haystack", default="noise", metavar="SOURCE",
                      help="noise, essays (Python's pydoc topics), file:PATH, dir:PATH or dataset:NAME[:SPLIT[:COLUMN]] (default: %(default)s)")
    task.add_argument("--needle", help="your own needle sentence (--task needle)")
    task.add_argument("--question", help="the question about your needle (--task needle)")
    task.add_argument("--answer-prefix", help="text the answer starts with (--task needle; default 'Answer:')")
    task.add_argument("--answer", help="the expected answer (--task needle; default: the needle)")
    run = parser.add_argument_group("run")
    run.add_argument("--scoring", choices=("generate", "teacher-forced"), default="generate",
                     help="greedy generation + string match, or one teacher-forced pass (default: %(default)s)")
    run.add_argument("--prompt", choices=("auto", "chat", "raw"), default="auto",
                     help="chat template or raw text; auto = chat when the tokenizer has a template (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of the needle values (default: %(default)s)")
    run.add_argument("--no-prefix-reuse", action="store_true", help="prefill every prompt from scratch (for comparison)")
    run.add_argument("--chunk-size", type=token_count, default=2048, metavar="T", help="prefill chunk, bounds activation memory (default: %(default)s)")
    run.add_argument("--device", default="auto", metavar="cpu|cuda|auto",
                     help="where the model runs; auto = cuda when available (default: %(default)s)")
    run.add_argument("--sequence-parallel", type=int, default=1, metavar="P",
                     help="shard each prompt's KV cache across P processes, launched as torchrun --nproc-per-node P "
                     "-m longctx needle ...; rank 0 writes the output (default: %(default)s)")
    run.add_argument("--threshold", type=float, metavar="F",
                     help="score (0-1) defining the effective length (default: 0.85; 0.856 with --suite ruler, RULER's 85.6)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output, skipping finished samples")
    suite = parser.add_argument_group("suite (instead of a grid)")
    suite.add_argument("--suite", choices=("ruler",), help="RULER's tasks x --lengths x --samples, its table and effective length")
    suite.add_argument("--tasks", metavar="T,T,...", help="RULER tasks to run (default: all 13; the 11 without QA data)")
    suite.add_argument("--qa-data", metavar="DIR", help="directory with squad.json and hotpotqa.json for qa_1, qa_2")
    add_output_arguments(parser)
    add_allow_pickle_argument(parser)
    parser.set_defaults(func=run_command, grid_defaults={flag: parser.get_default(flag) for flag in GRID_ONLY})


GRID_ONLY = ("depths", "num_depths", "depth_spacing", "task", "value_type", "haystack", "needle", "question",
             "answer_prefix", "answer", "scoring")


def lengths_from_args(args: argparse.Namespace) -> list[int]:
    from longctx.errors import LongctxError
    from longctx.eval.grid import linear_lengths

    if args.lengths and (args.min_len or args.max_len):
        raise LongctxError("give --lengths or --min-len/--max-len, not both")
    if args.lengths:
        return args.lengths
    if args.min_len and args.max_len:
        return linear_lengths(args.min_len, args.max_len, args.num_lengths)
    raise LongctxError("no lengths: pass --lengths 1k,2k,4k or --min-len 1k --max-len 8k [--num-lengths N]")


def grid_from_args(args: argparse.Namespace):
    from longctx.eval.grid import DEFAULT_THRESHOLD, GridPlan, grid_depths

    lengths = lengths_from_args(args)
    depths = args.depths if args.depths is not None else grid_depths(args.num_depths, args.depth_spacing)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    return GridPlan(lengths, depths, args.samples, not args.no_prefix_reuse, args.chunk_size, threshold,
                    args.device, args.sequence_parallel)


def run_suite_command(args: argparse.Namespace) -> int:
    from longctx.errors import LongctxError
    from longctx.eval.suite import DEFAULT_SUITE_THRESHOLD, SuitePlan, SuiteSettings, format_suite_table, run_suite

    given = [flag for flag, default in args.grid_defaults.items() if getattr(args, flag) != default]
    if given:
        raise LongctxError(f"--{given[0].replace('_', '-')} applies to a grid, not to --suite; drop it")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    threshold = DEFAULT_SUITE_THRESHOLD if args.threshold is None else args.threshold
    plan = SuitePlan(lengths_from_args(args), tasks, args.samples, not args.no_prefix_reuse, args.chunk_size, threshold,
                     args.qa_data, args.device, args.sequence_parallel)
    settings = SuiteSettings(model=str(args.model), suite=args.suite, prompt=args.prompt, seed=args.seed,
                             qa_data=args.qa_data)
    summary = run_suite(settings, plan, args.output, resume=args.resume, overwrite=args.overwrite,
                        allow_pickle=args.allow_pickle)
    if summary is None:  # a rank other than 0 of --sequence-parallel: rank 0 reports
        return 0
    print(format_suite_table(summary))
    print(f"{summary['samples_done']} samples; results in {args.output}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    from longctx.eval.grid import NeedleSettings, format_table, run_grid

    if args.suite:
        return run_suite_command(args)
    if args.tasks or args.qa_data:
        from longctx.errors import LongctxError

        raise LongctxError("--tasks and --qa-data apply to --suite ruler; add --suite ruler or drop them")
    plan = grid_from_args(args)
    settings = NeedleSettings(
        model=str(args.model), task=args.task, value_type=args.value_type, haystack=args.haystack,
        scoring=args.scoring, prompt=args.prompt, seed=args.seed, needle=args.needle, question=args.question,
        answer_prefix=args.answer_prefix, answer=args.answer,
    )
    summary = run_grid(settings, plan, args.output, resume=args.resume, overwrite=args.overwrite,
                       allow_pickle=args.allow_pickle)
    if summary is None:  # a rank other than 0 of --sequence-parallel: rank 0 reports
        return 0
    print(format_table(summary))
    effective = summary["effective_length"]
    print(
        f"mean score {summary['mean_score']} over {summary['samples_done']} samples; effective length "
        f"{effective if effective else 'none'} (mean >= {summary['threshold']}); results in {args.output}"
    )
    return 0
