"""`longctx train`: progressive long-sequence fine-tuning from a YAML config, resumable, distributed."""

from __future__ import annotations

import argparse
import os

from longctx.commands._args import add_allow_pickle_argument, formatter

DESCRIPTION = """\
Fine-tune a model progressively to a long context, stage by stage (as Gradient took
Llama-3-8B from 8K to 1M and EasyContext Llama-2-7B to 512K). Before each stage the
model's rope parameters are set for the stage's length (planned by method, or an explicit
theta) and its rotary buffers rebuilt; after it, the stage's model is saved as a model
directory and the next stage continues from it. The output is a model directory that
transformers loads as is; its longctx.json records the whole schedule.

The config (YAML) names the model, output, stages (seq_len, rope, steps or tokens,
learning_rate, batch_size, gradient_accumulation), data (synthetic-passkey, local
jsonl/parquet/text files, or a hub dataset), mode (full or lora = LongLoRA), precision,
activation_checkpointing, loss_chunk_size, parallel.sequence_parallel, seed and logging.
See docs/train.md and configs/*.yaml.

Checkpoints go to <output>-checkpoints (config: checkpoint_dir): resumable states every
logging.checkpoint_every steps, a model directory per finished stage, and metrics.jsonl.
Kill the run at any point and re-run with --resume to continue exactly where the last
checkpoint left off.

Distributed: launch with torchrun. Ranks form groups of parallel.sequence_parallel that
share one sequence through zigzag ring attention; parameters and optimizer state are
sharded over all ranks with FSDP2 (gloo on CPU, NCCL on GPUs)."""

EPILOG = """\
examples:
  longctx train --config configs/tiny-passkey.yaml --output out/tiny-1k
  longctx train --config configs/smollm2-135m-32k.yaml --resume
  longctx train --config my.yaml --model out/smollm2-32k-extended --output out/trained
  torchrun --nproc-per-node 2 -m longctx train --config configs/tiny-passkey.yaml   # sequence_parallel: 2
  scripts/launch_multinode.sh --config configs/llama3-8b-1m.yaml                    # see the script's header
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="progressive long-sequence fine-tuning from a YAML config (resumable, distributed)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="training config (YAML); see configs/")
    parser.add_argument("--output", metavar="DIR", help="final model directory (default: the config's output)")
    parser.add_argument("--model", metavar="MODEL", help="start from this model instead of the config's model")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output and start over, discarding earlier checkpoints")
    add_allow_pickle_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the metrics log is still written)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longctx.models.metadata import read_metadata
    from longctx.train.api import train_from_config

    output = train_from_config(
        args.config, output=args.output, model=args.model, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress, allow_pickle=args.allow_pickle,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    metadata = read_metadata(output) if output else None
    if metadata:
        print(f"trained model: {output}")
        for stage in metadata.get("stages", []):
            rope = stage["rope"]["rope_parameters"]
            print(
                f"  stage {stage['stage']}: seq_len {stage['seq_len']}, {stage['steps']} steps, "
                f"{stage['tokens']:,} tokens, rope {rope.get('rope_type')} theta {rope.get('rope_theta'):g}"
                + (f" factor {rope['factor']:g}" if "factor" in rope else "")
                + f", final loss {stage['final_loss']:.4f}"
            )
    return 0
