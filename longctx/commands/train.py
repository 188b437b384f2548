"""`longctx train`: progressive long-sequence fine-tuning from a YAML config, resumable, distributed."""

from __future__ import annotations

import argparse
import os

from longctx.errors import LongctxError

from longctx.commands._args import add_allow_pickle_argument, byte_count, formatter
from longctx.train.dry_run import MFU, PEAK_TFLOPS

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
    dry = parser.add_argument_group("dry run (no weights, no processes: what each rank of the run would hold)")
    dry.add_argument("--dry-run", action="store_true",
                     help="build the model from its config.json on the meta device, shard it as rank 0 of "
                          "--world-size would, and print per stage the memory per rank and a step time; exit 2 "
                          "naming the first stage that does not fit --gpu-memory")
    dry.add_argument("--world-size", type=int, metavar="N", help="ranks of the run (default: parallel.sequence_parallel)")
    dry.add_argument("--gpu-memory", type=byte_count, metavar="SIZE", help="memory per rank, e.g. 80GiB")
    dry.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, metavar="T",
                     help="dense TFLOPS of one rank in the run's precision (default: %(default)g, an H100 in bfloat16)")
    dry.add_argument("--mfu", type=float, default=MFU, metavar="F",
                     help="model FLOPs utilization assumed for the step time (default: %(default)g)")
    dry.add_argument("--json", action="store_true", help="print the dry run as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the metrics log is still written)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return dry_run(args)
    given = [flag for flag, value in (("--world-size", args.world_size), ("--gpu-memory", args.gpu_memory),
                                      ("--json", args.json or None)) if value is not None]
    if given:
        raise LongctxError(f"{', '.join(given)} describe a dry run; add --dry-run")
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


def dry_run(args: argparse.Namespace) -> int:
    import json

    from longctx.train.config import load_config
    from longctx.train.dry_run import Hardware, estimate_run, format_estimate, gib, suggestion

    if args.resume or args.overwrite:
        raise LongctxError("--dry-run writes nothing; drop --resume and --overwrite")
    if not 0 < args.mfu <= 1 or args.peak_tflops <= 0:
        raise LongctxError("--mfu must be in (0, 1] and --peak-tflops positive")
    config = load_config(args.config, model=args.model)
    world_size = args.world_size or config.parallel.sequence_parallel
    hardware = Hardware(memory_bytes=args.gpu_memory, peak_tflops=args.peak_tflops, mfu=args.mfu)
    estimate = estimate_run(config, world_size=world_size, hardware=hardware)
    print(json.dumps(estimate.to_json(), indent=2) if args.json else format_estimate(estimate))
    too_big = next((stage for stage in estimate.stages if stage.fits is False), None)
    if too_big is not None:
        raise LongctxError(
            f"stage {too_big.stage} (seq_len {too_big.seq_len}) needs {gib(too_big.total)} per rank, more than "
            f"--gpu-memory {gib(hardware.memory_bytes)}; try {suggestion(config, world_size, hardware, too_big)}"
        )
    return 0
