"""`longctx ppl`: perplexity by context length, several models side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from longctx.commands._args import add_allow_pickle_argument, add_output_arguments, formatter, token_count, token_count_list
from longctx.models.reference import DEFAULT_MODEL

DESCRIPTION = """\
Perplexity of the first L tokens of a long text for each length L, for one or more models:
the quick way to see where a model's context ends and how scaling methods compare before
and after fine-tuning. One table (lengths x models) is printed; with --output, ppl.json
and ppl.png (perplexity against length, one line per model) are written too.

With static rope scaling one chunked pass over the longest length gives every length; with
dynamic NTK each length gets its own pass (its rotation depends on the sequence length)."""

EPILOG = """\
examples:
  # the default model on Python's own documentation prose
  longctx ppl --lengths 1k,2k,4k,8k,16k
  # scaling methods side by side, on your own text, with a plot
  longctx ppl --model smollm2-135m --model out/yarn-32k --model out/ntk-32k \\
      --text file:book.txt --lengths 2k,4k,8k,16k,32k --output out/ppl
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ppl", help="perplexity by context length, models side by side", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--model", action="append", metavar="MODEL",
                        help=f"model directory, .gguf file, hub id or {DEFAULT_MODEL}; repeat to compare (default: {DEFAULT_MODEL})")
    parser.add_argument("--text", default="essays", metavar="SOURCE",
                        help="essays (Python's pydoc topics), file:PATH, dir:PATH or dataset:NAME[:SPLIT[:COLUMN]] (default: %(default)s)")
    parser.add_argument("--lengths", type=token_count_list, required=True, metavar="L,L,...", help="context lengths, e.g. 1k,2k,4k")
    parser.add_argument("--chunk-size", type=token_count, default=1024, metavar="T", help="tokens per forward chunk (default: %(default)s)")
    add_output_arguments(parser, required=False)
    add_allow_pickle_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from longctx.errors import LongctxError
    from longctx.eval.engine import check_memory
    from longctx.tasks.haystacks import encode, load_haystack_text
    from longctx.eval.perplexity import format_ppl_table, perplexity_by_length, plot_ppl
    from longctx.models import atomic_output_dir, check_output_free, load_model_and_tokenizer, resolve_model

    from longctx.models.reference import reference_path
    from longctx.tasks.haystacks import haystack_path

    references = args.model or [DEFAULT_MODEL]
    if args.output:
        inputs = {f"model {reference}": reference_path(reference) for reference in references}
        check_output_free(args.output, args.overwrite, inputs={**inputs, "the text": haystack_path(args.text)})
    if not args.lengths:
        raise LongctxError("no lengths: pass --lengths 1k,2k,4k")
    lengths = sorted(set(args.lengths))
    text = load_haystack_text(args.text)
    if not text.strip():
        raise LongctxError(f"text {args.text!r} is empty; point at a file or dataset with text in it")
    results: dict[str, dict[int, float]] = {}
    for reference in references:
        model_dir = resolve_model(reference)
        model, tokenizer = load_model_and_tokenizer(model_dir, allow_pickle=args.allow_pickle)
        check_memory(model, lengths[-1], chunk_size=args.chunk_size, reuse=False)
        name = Path(reference).name if Path(reference).exists() else reference
        if name in results:
            name = str(model_dir)
        ids = encode(tokenizer, text)
        results[name] = perplexity_by_length(model, ids, lengths, chunk_size=args.chunk_size)
        print(f"{name}: " + ", ".join(f"{L}: {value:.3f}" for L, value in results[name].items()), flush=True)
        del model
    print(format_ppl_table(results, lengths))
    if args.output:
        with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
            data = {"text": args.text, "lengths": lengths,
                    "perplexity": {name: {str(L): value for L, value in by.items()} for name, by in results.items()}}
            (tmp / "ppl.json").write_text(json.dumps(data, indent=2) + "\n")
            plot_ppl(results, tmp / "ppl.png", title=f"Perplexity by context length on {args.text}")
        print(f"wrote {args.output}/ppl.json and ppl.png")
    return 0
