"""`longctx train --dry-run`: what one rank of an N-rank run holds at each stage, without weights or processes.

The model is built from its config.json on the meta device, wrapped as the run wraps it (LongLoRA
in lora mode, the chunked loss) and sharded with train/distributed.py's own `shard_module` as
rank 0 of N on a fake process group: the parameter, gradient and optimizer bytes are read off
rank 0's local FSDP2 shards, and the gathered sizes of the largest decoder layer and of the root
(embeddings, final norm, head) off the same modules. Activations, the loss chunk and the
sequence-parallel buffers follow from the stage's local tokens and the model's shapes (the
terms below, for transformers' Llama decoder layer).

The peak of a step is the largest of three moments:
- the loss backward: every layer's checkpointed input is held, one loss chunk's logits are
  recomputed with their gradients, and the head's gradient is allocated;
- the backward of the first decoder layer (the last to run): the other layers' gradients exist
  (sharded under FSDP), the layer's recomputed activations and its working gradients are alive;
- the optimizer step: every gradient and the optimizer state.
FSDP2 adds, while forward and backward run, the gathered root (kept gathered for backward) and two
gathered layers (the one computing and the one prefetched), and in backward one layer's gathered
gradient before its reduce-scatter.

The step time is the step's model FLOPs on one rank (6 x parameters x tokens, plus causal
attention, 6 x layers x hidden x sequence per token) over the stated MFU of the stated peak; with
activation checkpointing the hardware also recomputes the forward, which MFU by convention does
not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from longctx.errors import LongctxError
from longctx.train.config import StageConfig, TrainConfig
from longctx.units import format_token_total

FLOAT32 = 4
ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, float32 like the master weights
PEAK_TFLOPS = 989.0  # one H100 SXM, dense bfloat16
MFU = 0.4


@dataclass(frozen=True)
class Hardware:
    """What one rank has: memory (None: report only), peak dense TFLOPS in the run's precision, the MFU assumed."""

    memory_bytes: int | None = None
    peak_tflops: float = PEAK_TFLOPS
    mfu: float = MFU


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)


@dataclass(frozen=True)
class Layout:
    """Rank 0's share of the model after FSDP2 over world_size ranks (bytes, float32)."""

    world_size: int
    parameter_count: int  # the whole model
    matmul_count: int  # all but an untied input embedding (a lookup, no FLOPs)
    trainable_count: int
    local_parameters: int
    local_trainable: int
    gathered_layer: int  # the largest decoder layer, all-gathered
    gathered_layer_trainable: int
    gathered_root: int  # embeddings, final norm and head, all-gathered
    gathered_root_trainable: int
    gathered_head_trainable: int  # the head's gradient exists whole from the loss backward to the end of backward


@dataclass
class StageEstimate:
    stage: int
    seq_len: int
    local_tokens: int  # tokens of one micro-batch on one rank
    parameters: int  # bytes: local shards, plus the gathered root and layers while the step runs
    gradients: int
    optimizer: int
    activations: int
    loss: int
    communication: int  # FSDP's gathered gradients, the ring's key/value blocks
    total: int
    peak_at: str  # the moment of the step that peaks
    step_seconds: float
    tokens_per_second: float
    fits: bool | None = None


@dataclass
class RunEstimate:
    model: str
    world_size: int
    sequence_parallel: int
    data_parallel: int
    mode: str
    precision: str
    hardware: Hardware
    layout: Layout
    stages: list[StageEstimate] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --- the layout -----------------------------------------------------------------------------------


def model_config(reference: str):
    """The transformers config of a model reference, from its config.json alone (no weights)."""
    from transformers import AutoConfig

    from longctx.models.reference import DEFAULT_MODEL, resolve_model

    path = Path(reference).expanduser()
    if reference == DEFAULT_MODEL:
        path = resolve_model(reference)
    elif path.is_file() and path.name == "config.json":
        path = path.parent
    if not (path / "config.json").is_file():
        raise LongctxError(
            f"the dry run reads the model's config.json only and found none for {reference!r}; pass --model DIR "
            "with the model's config.json (no weights needed), e.g. configs/models/meta-llama-3-8b-instruct"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise LongctxError(f"cannot read {path}/config.json: {str(error).splitlines()[0]}") from error


@contextlib.contextmanager
def fake_world(world_size: int):
    """torch.distributed as rank 0 of world_size, on a process group that communicates nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise LongctxError("the dry run simulates every rank in one process; run it without torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_module(config: TrainConfig):
    """The trained module as the run wraps it (LongLoRA in lora mode, the chunked loss), on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from longctx.train.loop import apply_longlora
    from longctx.train.loss import CausalLMLoss

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(config.model), dtype=torch.float32)
    if config.mode == "lora":
        model = apply_longlora(model, config)
    return CausalLMLoss(model, config.loss_chunk_size)


def rank_zero_shards(config: TrainConfig, world_size: int) -> list[tuple[int, bool]]:
    """(bytes, trainable) of rank 0's local shard of every parameter under the run's FSDP2 sharding."""
    import torch

    from longctx.train.distributed import Runtime, shard_module

    module = meta_module(config)
    with fake_world(world_size):
        shard_module(module, Runtime(world_size=world_size, device=torch.device("cpu")))
        return [(p.to_local().numel() * FLOAT32, p.requires_grad) for p in module.parameters()]


def build_layout(config: TrainConfig, world_size: int) -> Layout:
    """Rank 0's parameters as the run shards them: meta-device model, the run's wrapping, FSDP2."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from longctx.train.loss import unwrap_causal_lm

    module = meta_module(config)
    model = module.model
    layers = list(unwrap_causal_lm(model).model.layers)
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}

    def gathered(parameters, trainable_only=False):
        return sum(p.numel() * FLOAT32 for p in parameters if p.requires_grad or not trainable_only)

    biggest = max(layers, key=lambda layer: sum(p.numel() for p in layer.parameters()))
    root = [p for p in module.parameters() if id(p) not in layer_ids]
    embedding = unwrap_causal_lm(model).get_input_embeddings().weight
    tied = embedding is unwrap_causal_lm(model).get_output_embeddings().weight
    total = sum(p.numel() for p in module.parameters())
    counts = dict(
        parameter_count=total,
        matmul_count=total if tied else total - embedding.numel(),
        trainable_count=sum(p.numel() for p in module.parameters() if p.requires_grad),
        gathered_layer=gathered(biggest.parameters()),
        gathered_layer_trainable=gathered(biggest.parameters(), True),
        gathered_root=gathered(root),
        gathered_root_trainable=gathered(root, True),
        gathered_head_trainable=gathered([unwrap_causal_lm(model).get_output_embeddings().weight], True),
    )
    if world_size == 1:
        full = gathered(module.parameters())
        return Layout(world_size=1, local_parameters=full, local_trainable=gathered(module.parameters(), True), **counts)
    # In a forked child: a fake world leaves torch.distributed state behind (meshes, DTensor caches) that
    # later real process groups of this process would trip on.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        local = pool.submit(rank_zero_shards, config, world_size).result()
    return Layout(world_size=world_size, local_parameters=sum(size for size, _ in local),
                  local_trainable=sum(size for size, trainable in local if trainable), **counts)


# --- activations ------------------------------------------------------------------------------------


ATTENTION_KINDS = ("sdpa", "sdpa-masked")  # the ring (parallel/) saves what sdpa saves


def layer_saved_per_token(shape: ModelShape, compute: int, attention: str) -> int:
    """Bytes one decoder layer saves for backward per token (transformers' LlamaDecoderLayer under
    autocast; tests/test_train_dry_run.py holds it to the tensors autograd saves).

    RMSNorm runs in float32: it saves x * rsqrt (and rsqrt); each projection saves its input, cast
    to the compute dtype once per projection under autocast (one shared tensor in float32); rope's
    float32 cos/sin promote q and k to float32. sdpa saves q and k cast back, v, its output (which
    o_proj reads as a view) and a float32 log-sum-exp; with a mask of packed documents
    ("sdpa-masked") transformers repeats the KV heads to all heads. The ring (longctx_ring) saves
    what sdpa saves. The second norm saves the attention residual sum; the MLP saves gate, up,
    SiLU(gate) and their product."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    casts = compute != FLOAT32
    norm1 = FLOAT32 * (1 + h) + compute * h * (3 if casts else 1)
    norm2 = FLOAT32 * (1 + h) + compute * h * (2 if casts else 1)
    lse = FLOAT32 * shape.heads
    if attention == "sdpa":
        attention_bytes = compute * (q + kv) + compute * kv + compute * q + lse
    elif attention == "sdpa-masked":
        attention_bytes = compute * 3 * q + compute * q + lse
    else:
        raise ValueError(f"attention {attention!r} is not one of {ATTENTION_KINDS}")
    residual = FLOAT32 * h
    mlp = 4 * compute * i
    return norm1 + attention_bytes + residual + norm2 + mlp


def layer_backward_working_per_token(shape: ModelShape, compute: int) -> int:
    """Gradients alive inside one layer's backward on top of what it saved: the gradient arriving from
    above (float32 residual), and in the MLP the gradients of its product, activation and up projection."""
    return FLOAT32 * shape.hidden + 3 * compute * shape.intermediate


def loss_chunk_peak(shape: ModelShape, chunk: int, compute: int) -> int:
    """A chunk's recomputed cross-entropy in backward: float32 log-softmax (saved), the gradient of it and
    of the logits (float32), and the compute-dtype logits and their gradient when those are narrower."""
    narrow = 2 * compute if compute != FLOAT32 else 0
    return chunk * shape.vocab * (3 * FLOAT32 + narrow)


def ring_buffers_per_token(shape: ModelShape) -> int:
    """The ring's backward working set beyond what attention saved (parallel/ring.py's docstring): the
    output gradient and dq (2h heads), the travelling k, v, dK, dV of one step and one in transit."""
    return FLOAT32 * shape.head_dim * (2 * shape.heads + 5 * shape.kv_heads)


def sequence_parallel_buffers_per_token(shape: ModelShape, compute: int, sp: int, ulysses: int) -> int:
    """The ring's buffers over sp / ulysses ranks (each holding ulysses x the local tokens, with
    heads / ulysses query heads), plus Ulysses' all-to-all copies of q, K, V (repeated) and the output."""
    if sp == 1:
        return 0
    from longctx.parallel.ulysses import kv_head_repeats

    repeats = kv_head_repeats(shape.kv_heads, ulysses) if ulysses > 1 else 1
    per_token = 0
    if sp // ulysses > 1:
        per_token += ring_buffers_per_token(dataclasses.replace(shape, kv_heads=shape.kv_heads * repeats))
    if ulysses > 1:
        per_token += compute * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads * repeats)
    return per_token


# --- the estimate -----------------------------------------------------------------------------------


def estimate_stage(index: int, stage: StageConfig, config: TrainConfig, shape: ModelShape, layout: Layout,
                   hardware: Hardware) -> StageEstimate:
    sp = config.parallel.sequence_parallel
    compute = 2 if config.precision == "bfloat16" else FLOAT32
    tokens = stage.seq_len * stage.batch_size // sp
    sharded = layout.world_size > 1
    lora = config.mode == "lora"

    checkpointed = FLOAT32 * shape.hidden * tokens
    # In one process transformers gives sdpa a boolean [seq, seq] mask of the packed documents (held for
    # the whole step), which sdpa converts to an additive mask in the compute dtype and saves, per layer.
    attention = "sdpa" if sp > 1 else "sdpa-masked"
    bool_mask = stage.seq_len**2 * stage.batch_size if attention == "sdpa-masked" else 0
    saved = layer_saved_per_token(shape, compute, attention) * tokens + bool_mask * compute
    from longctx.parallel.ulysses import kv_head_repeats  # torch: not at import (`longctx train --help`)

    ulysses = config.parallel.ulysses
    repeats = kv_head_repeats(shape.kv_heads, ulysses) if ulysses > 1 else 1
    kv = shape.kv_heads * shape.head_dim
    saved += 2 * compute * kv * (repeats - 1) * tokens  # Ulysses' repeated K and V (parallel/ulysses.py)
    working = layer_backward_working_per_token(shape, compute) * tokens
    weight_casts = compute * layout.gathered_layer // FLOAT32 if compute != FLOAT32 else 0  # autocast's copies
    if config.activation_checkpointing:
        held = shape.layers * checkpointed  # every layer's input
        recomputing = saved + weight_casts + working  # one layer at a time
    else:
        held = shape.layers * (saved + weight_casts)
        recomputing = working
    rope = 2 * FLOAT32 * shape.head_dim * tokens  # cos and sin, shared by the layers
    final = 3 * FLOAT32 * shape.hidden * tokens  # the final norm's input and output, the loss's gathered copy
    chunk = min(config.loss_chunk_size or tokens, tokens)
    loss = loss_chunk_peak(shape, chunk, compute)
    ring = sequence_parallel_buffers_per_token(shape, compute, sp, ulysses) * tokens

    base_parameters = layout.local_parameters
    optimizer = ADAM_STATES * layout.local_trainable
    gathered = layout.gathered_root + 2 * layout.gathered_layer if sharded else 0
    head_gradient = layout.gathered_head_trainable  # whole until the end of backward (FSDP reduces the root last)
    layer_gradients_sharded = layout.local_trainable  # at most every layer's shard (plus the root's)
    gathered_layer_gradient = layout.gathered_layer_trainable if sharded else 0

    moments = {
        "loss backward": dict(
            parameters=base_parameters + gathered, gradients=head_gradient, optimizer=optimizer,
            activations=held + rope + bool_mask + final, loss=loss, communication=0),
        "first layer's backward": dict(
            parameters=base_parameters + gathered,
            gradients=(head_gradient + layer_gradients_sharded) if sharded else layout.local_trainable,
            optimizer=optimizer, activations=(checkpointed + rope + bool_mask + recomputing), loss=0,
            communication=gathered_layer_gradient + ring),
        "optimizer step": dict(
            parameters=base_parameters, gradients=layout.local_trainable, optimizer=optimizer,
            activations=0, loss=0, communication=0),
    }
    if lora:  # frozen weights get no gradient; only adapters, embeddings and norms do
        moments["first layer's backward"]["gradients"] = layout.local_trainable + (head_gradient if sharded else 0)
    peak_at, peak = max(moments.items(), key=lambda item: sum(item[1].values()))
    total = sum(peak.values())

    flops = step_flops(stage, shape, sp, parameters=layout.matmul_count, trainable=layout.trainable_count)
    seconds = flops / (hardware.peak_tflops * 1e12 * hardware.mfu)
    dp = layout.world_size // sp
    return StageEstimate(
        stage=index + 1, seq_len=stage.seq_len, local_tokens=tokens, total=total, peak_at=peak_at,
        step_seconds=seconds, tokens_per_second=stage.tokens_per_step(dp) / seconds,
        fits=None if hardware.memory_bytes is None else total <= hardware.memory_bytes, **peak,
    )


def step_flops(stage: StageConfig, shape: ModelShape, sp: int, *, parameters: int, trainable: int) -> float:
    """Model FLOPs of one optimizer step on one rank: per token, forward 2N and the input gradient 2N
    over the N weights that multiply (all but an untied input embedding), the weight gradient 2N over
    those that train, plus causal attention."""
    tokens = stage.seq_len * stage.batch_size * stage.gradient_accumulation / sp
    dense = (4 * parameters + 2 * min(trainable, parameters)) * tokens
    attention = 6 * shape.layers * shape.heads * shape.head_dim * stage.seq_len * tokens
    return dense + attention


def estimate_run(config: TrainConfig, *, world_size: int, hardware: Hardware = Hardware()) -> RunEstimate:
    sp = config.parallel.sequence_parallel
    if world_size < 1 or world_size % sp:
        raise LongctxError(f"--world-size {world_size} cannot form groups of parallel.sequence_parallel={sp}; "
                           "give a multiple of it")
    layout = build_layout(config, world_size)
    shape = ModelShape.from_config(model_config(config.model))
    estimate = RunEstimate(model=config.model, world_size=world_size, sequence_parallel=sp,
                           data_parallel=world_size // sp, mode=config.mode, precision=config.precision,
                           hardware=hardware, layout=layout)
    estimate.stages = [estimate_stage(i, stage, config, shape, layout, hardware) for i, stage in enumerate(config.stages)]
    return estimate


def suggestion(config: TrainConfig, world_size: int, hardware: Hardware, stage: StageEstimate) -> str:
    """The first change that makes the stage fit, cheapest first: a smaller loss chunk, activation
    checkpointing, more sequence-parallel ranks, LoRA."""
    sp = config.parallel.sequence_parallel
    one = dataclasses.replace(config, stages=[config.stages[stage.stage - 1]])
    candidates = []
    if config.loss_chunk_size == 0 or config.loss_chunk_size > 1024:
        candidates.append(("loss_chunk_size: 1024", dataclasses.replace(one, loss_chunk_size=1024)))
    if not config.activation_checkpointing:
        candidates.append(("activation_checkpointing: true", dataclasses.replace(one, activation_checkpointing=True)))
    for more in (2 * sp, 4 * sp, 8 * sp):
        if more <= world_size and world_size % more == 0 and one.stages[0].seq_len % (2 * more) == 0:
            candidates.append((f"parallel.sequence_parallel: {more}",
                               dataclasses.replace(one, parallel=dataclasses.replace(one.parallel, sequence_parallel=more))))
    if config.mode != "lora":
        candidates.append(("mode: lora", dataclasses.replace(one, mode="lora")))
    for change, candidate in candidates:
        (estimated,) = estimate_run(candidate, world_size=world_size, hardware=hardware).stages
        if estimated.fits:
            return f"{change} (then {gib(estimated.total)} per rank)"
    return f"more ranks than {world_size}, or GPUs with more memory"


# --- report ----------------------------------------------------------------------------------------


def gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def format_estimate(estimate: RunEstimate) -> str:
    layout, hardware = estimate.layout, estimate.hardware
    lines = [
        f"dry run: {estimate.model}, {estimate.mode} fine-tune in {estimate.precision}, rank 0 of {estimate.world_size} "
        f"(sequence parallel {estimate.sequence_parallel} x data parallel {estimate.data_parallel}, FSDP2 over all)",
        f"parameters: {format_token_total(layout.parameter_count)} ({format_token_total(layout.trainable_count)} trained); "
        f"rank 0 holds {gib(layout.local_parameters)} of float32 shards",
        f"step time at {hardware.mfu:.0%} MFU of {hardware.peak_tflops:g} TFLOPS per rank"
        + (f"; memory per rank {gib(hardware.memory_bytes)}" if hardware.memory_bytes else ""),
        "",
        f"{'stage':>5} {'seq_len':>9} {'tokens/rank':>11} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9} "
        f"{'loss':>9} {'comm':>9} {'total':>9}  {'step s':>7} {'tok/s':>9}  peak at",
    ]
    for s in estimate.stages:
        fit = "" if s.fits is None else ("  fits" if s.fits else "  DOES NOT FIT")
        lines.append(
            f"{s.stage:>5} {s.seq_len:>9} {s.local_tokens:>11} "
            + " ".join(f"{value / 2**30:>9.2f}" for value in (s.parameters, s.gradients, s.optimizer, s.activations,
                                                              s.loss, s.communication, s.total))
            + f"  {s.step_seconds:>7.1f} {s.tokens_per_second:>9,.0f}  {s.peak_at}{fit}"
        )
    lines.append("(GiB per rank at the step's peak; step s and tok/s for one optimizer step of the whole run)")
    return "\n".join(lines)
