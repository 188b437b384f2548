"""`longctx merge-adapters` and the `merge_adapters` console script (the old script's flags)."""

from __future__ import annotations

import argparse
import sys

from longctx.commands._args import add_allow_pickle_argument, formatter
from longctx.commands._run import process_exit_code, run_parser
from longctx.lora.choices import COMBINE_METHODS
from longctx.models.dtypes import DTYPE_NAMES
from longctx.units import format_bytes

DESCRIPTION = """\
Merge LoRA adapters into a base model: W = W_base + sum_i w_i * scaling_i * B_i A_i, computed in
float32 and cast once, streaming the base model tensor by tensor (memory: about the adapters plus
a few tensors). modules_to_save: the last adapter wins (with a warning). When an adapter carries
longctx rope metadata (from extract-lora or train), the merged config gets its rope_parameters and
max_position_embeddings. Every adapter is checked against the base before anything is written.
With --combine, writes one combined PEFT adapter instead of a merged model."""

EPILOG = """\
examples:
  # the old script's command line keeps working
  merge_adapters --base_model_name_or_path BASE --peft_model_paths a b c --output_dir OUT

  # make a sibling fine-tune long: apply a long-context adapter from extract-lora
  longctx merge-adapters --base_model_name_or_path my-finetune \\
      --peft_model_paths out/long-lora --output_dir out/my-finetune-long

  # weight each adapter, write bfloat16
  longctx merge-adapters --base_model_name_or_path BASE --peft_model_paths a b \\
      --weights 1.0 0.5 --dtype bfloat16 --output_dir OUT

  # one adapter from several (no base model needed)
  longctx merge-adapters --peft_model_paths a b --combine svd --svd-rank 16 --output_dir combined
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    old = parser.add_argument_group("the old merge_adapters script's flags")
    old.add_argument("--base_model_name_or_path", "--base-model", dest="base_model", metavar="MODEL",
                     help="base model: directory, .gguf, smollm2-135m, or hub id (not needed with --combine)")
    old.add_argument("--peft_model_paths", "--adapters", dest="adapters", nargs="+", required=True, metavar="ADAPTER",
                     help="PEFT LoRA adapter directories, applied in this order")
    old.add_argument("--output_dir", "--output", dest="output_dir", required=True, metavar="DIR",
                     help="directory to write (must not exist unless --overwrite)")
    old.add_argument("--device", default="cpu",
                     help="where to compute the B @ A products: cpu, cuda, cuda:N or auto (default: %(default)s)")
    old.add_argument("--push_to_hub", action="store_true",
                     help="also upload the result as a private hub repository named after --output_dir "
                     "(fails at once where the hub is unreachable)")
    old.add_argument("--trust_remote_code", action="store_true",
                     help="allow the base model's custom config code (only its config is read)")

    new = parser.add_argument_group("longctx")
    new.add_argument("--weights", nargs="+", type=float, metavar="W",
                     help="one scale per adapter, multiplying its LoRA deltas (default: 1 each)")
    new.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                     help="output dtype (default: auto, the base model's own)")
    new.add_argument("--keep-base-config", action="store_true",
                     help="keep the base config's rope settings even when an adapter carries long-context ones")
    new.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    add_allow_pickle_argument(new)
    new.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="largest output shard, e.g. 2GB or 500MB (default: %(default)s)")

    combine = parser.add_argument_group("--combine: write one adapter instead of a merged model")
    combine.add_argument("--combine", choices=COMBINE_METHODS, metavar="METHOD",
                         help=f"combination method: {', '.join(COMBINE_METHODS)} (see docs/merge-adapters.md)")
    combine.add_argument("--svd-rank", type=int, metavar="R",
                         help="rank of svd/ties/dare results (default: the largest input rank)")
    combine.add_argument("--density", type=float, default=1.0,
                         help="fraction of entries kept by ties/dare (default: %(default)s)")
    combine.add_argument("--majority-sign", default="total", choices=["total", "frequency"],
                         help="ties sign election (default: %(default)s)")
    combine.add_argument("--seed", type=int, default=0, help="seed of dare's random masks (default: %(default)s)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge-adapters",
        help="merge LoRA adapters into a model (streaming, exact, carrying long-context rope settings)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def parse_size(text: str) -> int:
    from longctx.errors import LongctxError
    from longctx.units import parse_byte_count

    try:
        return parse_byte_count(text)
    except ValueError as error:
        raise LongctxError(f"--max-shard-size: {error}") from None


def run(args: argparse.Namespace) -> int:
    from longctx.errors import LongctxError
    from longctx.models.reference import hub_available, push_to_hub

    if args.push_to_hub and not hub_available():
        raise LongctxError(
            "--push_to_hub: cannot reach the Hugging Face hub from here; drop --push_to_hub to write the merged "
            "model locally and upload it later with `hf upload`"
        )
    if not args.combine and not args.base_model:
        raise LongctxError("--base_model_name_or_path is required to merge (only --combine works without a base model)")
    if args.combine and args.base_model:
        raise LongctxError("--combine writes one adapter and reads no base model; drop --base_model_name_or_path, "
                           "or drop --combine to merge into it")
    if not args.combine:
        given = [flag for flag, value, default in (("--svd-rank", args.svd_rank, None), ("--density", args.density, 1.0),
                 ("--majority-sign", args.majority_sign, "total"), ("--seed", args.seed, 0)) if value != default]
        if given:
            raise LongctxError(f"{', '.join(given)} only apply with --combine; add --combine METHOD or drop them")
    common = dict(weights=args.weights, keep_base_config=args.keep_base_config, overwrite=args.overwrite,
                  allow_pickle=args.allow_pickle)
    result = run_combine(args, common) if args.combine else run_merge(args, common)
    if args.push_to_hub:
        print(f"  pushed to the hub: {push_to_hub(result.output_dir, str(args.output_dir))}")
    return 0


def print_adapters(result) -> None:
    for path, weight in zip(result.adapters, result.weights):
        print(f"  adapter {path} (weight {weight:g})")


def print_warnings(result) -> None:
    if result.warnings:
        print(f"  warnings: {len(result.warnings)} (see above)")


def run_merge(args: argparse.Namespace, common: dict):
    from longctx.lora.merge import merge_adapters

    result = merge_adapters(args.base_model, args.adapters, args.output_dir, dtype=args.dtype, device=args.device,
                            trust_remote_code=args.trust_remote_code, max_shard_bytes=parse_size(args.max_shard_size),
                            **common)
    print(f"merged {len(result.adapters)} adapter(s) into {args.base_model} -> {result.output_dir}")
    print_adapters(result)
    print(f"  tensors changed: {result.changed_tensors} of {result.total_tensors}; "
          f"{format_bytes(result.output_bytes)} {result.dtype} in {len(result.shard_files)} shard(s)")
    if result.rope is not None:
        print(f"  rope settings from {result.rope.source}: rope_parameters {result.rope.rope_parameters}, "
              f"max_position_embeddings {result.rope.max_position_embeddings}")
    elif result.rope_skipped is not None:
        print(f"  rope settings of {result.rope_skipped.source} NOT applied (--keep-base-config): base config kept")
    else:
        print("  rope settings: no adapter carries any; base config kept")
    if result.untied:
        print(f"  untied: {', '.join(result.untied)} written separately (tie_word_embeddings: false)")
    print_warnings(result)
    print(f"  time: {result.seconds:.1f} s")
    return result


def run_combine(args: argparse.Namespace, common: dict):
    from longctx.lora.combine import combine_adapters

    result = combine_adapters(args.adapters, args.output_dir, method=args.combine, svd_rank=args.svd_rank,
                              density=args.density, majority_sign=args.majority_sign, seed=args.seed, **common)
    print(f"combined {len(result.adapters)} adapter(s) with {result.method} -> {result.output_dir}")
    print_adapters(result)
    print(f"  modules: {result.modules}, ranks {result.ranks}; modules_to_save: {', '.join(result.modules_to_save) or 'none'}")
    if result.rope is not None:
        print(f"  rope metadata carried from {result.rope.source} (max_position_embeddings {result.rope.max_position_embeddings})")
    print_warnings(result)
    return result


def legacy_main(argv: list[str] | None = None) -> int:
    """The `merge_adapters` console script: the old script's flags (and longctx's) on one command."""
    parser = argparse.ArgumentParser(
        prog="merge_adapters",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_arguments(parser)
    parser.set_defaults(func=run)
    return run_parser(parser, argv)


def legacy_console_main() -> int:
    return process_exit_code(legacy_main())


if __name__ == "__main__":
    sys.exit(legacy_console_main())
