"""One module per `longctx` subcommand: `register(subparsers)` adds its parser (flags, --help with
examples) and a function that calls the packages below; heavy imports stay inside those functions
so that `longctx --help` imports no torch. `_args.py` holds the argument types and flags several
commands share (the unit parsing itself is longctx/units.py's).

Imports: train, lora, eval and everything below them; never longctx.cli.
"""
