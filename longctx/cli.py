"""The `longctx` command line: one parser, one subcommand per module in longctx/commands/.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func` to a function taking the parsed arguments. Command modules import heavy
libraries (torch, transformers) inside their functions so `longctx --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys

from longctx import __version__
from longctx.errors import LongctxError

COMMAND_MODULES = [
    "longctx.commands.plan",
    "longctx.commands.extend",
    "longctx.commands.train",
    "longctx.commands.extract_lora",
    "longctx.commands.merge_adapters",
    "longctx.commands.needle",
    "longctx.commands.ppl",
]

EPILOG = """\
typical journey:
  longctx plan --model smollm2-135m --target-len 32k
  longctx extend --model smollm2-135m --target-len 32k --method yarn --output out/smollm2-32k
  longctx needle --model out/smollm2-32k --lengths 4k,8k,16k --output out/needle-32k
  longctx extract-lora BASE EXTENDED --output out/long-lora
  longctx merge-adapters --base_model_name_or_path OTHER --peft_model_paths out/long-lora --output_dir out/other-long

Run `longctx COMMAND --help` for each command's flags and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longctx",
        description="Extend the context window of RoPE language models (Llama family first) "
        "and move that capability between models as LoRA adapters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"longctx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a command still being built; tests check that every command is present
        module.register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse argv, run the chosen command, and turn LongctxError into a one-line error."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(message)s",
    )
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LongctxError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def process_exit_code(code: int) -> int:
    """The exit code of a process about to end, after freezing every live object out of the
    interpreter's final garbage collection: walking the objects that importing torch creates
    takes 0.4-0.5 s at exit, a tenth of a small extract-lora run. Console scripts only: in
    a process that goes on (tests), frozen objects would never be collected."""
    gc.freeze()
    return code


def console_main() -> int:
    """The `longctx` console script."""
    return process_exit_code(main())


if __name__ == "__main__":
    sys.exit(console_main())
