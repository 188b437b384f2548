"""The `longctx` command line: one parser, one subcommand per module in longctx/commands/.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func` to a function taking the parsed arguments. Command modules import heavy
libraries (torch, transformers) inside their functions so `longctx --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from longctx.version import __version__
from longctx.commands._run import process_exit_code, run_parser

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
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


def console_main() -> int:
    """The `longctx` console script."""
    return process_exit_code(main())


if __name__ == "__main__":
    sys.exit(console_main())
