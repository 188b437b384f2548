"""The training loop: stages of growing length, each with its rope settings, resumable at any step.

    for each stage:
        set the model's rope parameters for the stage and rebuild its rotary buffers
        for each optimizer step:
            read batch_size x gradient_accumulation packed rows (sequence-parallel ranks read the same rows)
            per micro-batch: zigzag-shard (sequence parallel), forward to hidden states, chunked
                cross-entropy summed over valid tokens, backward of sum / (valid tokens of the step)
            clip, step, schedule; log; every checkpoint_every steps save a resumable state
        save the stage's model directory (config with the stage's rope), continue from it
    write the final model directory with the whole schedule in longctx.json

Distribution (launched with torchrun): the ranks form a (dp, sp) mesh. Parameters and
optimizer state are sharded with FSDP2 (`fully_shard`) over all ranks; within a
sequence-parallel group every rank computes its shard's loss sum over the group's token
count, scaled by sp, so FSDP's gradient average over ranks is the sum over the sequence
and the mean over data-parallel replicas. One process needs no torch.distributed at all.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.errors import LongctxError
from longctx.models.dtypes import DTYPE_NAMES, torch_dtype
from longctx.labels import IGNORE_INDEX
from longctx.train import checkpoint as ckpt
from longctx.train.config import StageConfig, TrainConfig, check_parallel_fits_model
from longctx.train.data import BatchStream, packed_rows
from longctx.train.distributed import Runtime, check_world, setup_runtime, shard_module
from longctx.train.loss import CausalLMLoss, unwrap_causal_lm

log = logging.getLogger(__name__)



# --- model -----------------------------------------------------------------------------------


def load_model(model_dir: Path, config: TrainConfig, runtime: Runtime, *, allow_pickle: bool = False):
    """The causal LM (LoRA-wrapped in lora mode) in training mode, and its tokenizer."""
    from longctx.models.output import read_json
    from longctx.models.reference import load_pretrained
    from longctx.models.self_extend import attention_implementation

    attention = attention_implementation(read_json(model_dir / "config.json")) or "sdpa"
    if runtime.sp_size > 1:
        import longctx.parallel

        if attention != "sdpa":
            raise LongctxError(f"{model_dir} asks for {attention} attention, which sequence parallelism cannot shard; "
                               "train it with sequence_parallel 1, or extend without --self-extend")
        attention = longctx.parallel.ATTENTION_NAME
    # float32 master weights and optimizer state; precision bfloat16 autocasts the compute (train_step)
    model, tokenizer = load_pretrained(model_dir, allow_pickle=allow_pickle, dtype=torch.float32,
                                       attn_implementation=attention)
    if config.mode == "lora":
        model = apply_longlora(model, config)
    if config.activation_checkpointing:
        unwrap_causal_lm(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tokenizer


def apply_longlora(model, config: TrainConfig):
    """LongLoRA: LoRA on the attention projections, plus trainable embeddings and norms."""
    from peft import LoraConfig, get_peft_model

    settings = config.lora
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in settings.target_modules if target not in names]
    if missing:
        raise LongctxError(f"lora.target_modules {missing} are not modules of this model; use e.g. q_proj, k_proj, v_proj, o_proj")
    peft_config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(settings.target_modules)
    )
    model = get_peft_model(model, peft_config)
    for name, parameter in model.named_parameters():
        if any(keyword in name for keyword in settings.trainable) and "lora_" not in name:
            parameter.requires_grad_(True)
    return model


def set_rope(model, settings: dict) -> None:
    """Write rope settings into the model's config and rebuild the rotary embedding from it
    (transformers computes inv_freq once, in __init__)."""
    causal_lm = unwrap_causal_lm(model)
    config = causal_lm.config
    config.rope_parameters = dict(settings["rope_parameters"])
    config.max_position_embeddings = int(settings["max_position_embeddings"])
    old = causal_lm.model.rotary_emb
    device = old.inv_freq.device
    causal_lm.model.rotary_emb = type(old)(config=config).to(device)


def stage_rope(base_config: dict, stage: StageConfig) -> dict:
    """The rope settings of a stage: planned from the starting model's config, or given explicitly."""
    from longctx.rope import rope_for_length, rope_settings

    spec = stage.rope
    if spec.method is None and spec.theta is None:
        current = rope_settings(base_config)
        return {"rope_parameters": current["rope_parameters"],
                "max_position_embeddings": max(current["max_position_embeddings"], stage.seq_len)}
    if spec.method is None:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": spec.theta}, "max_position_embeddings": stage.seq_len}
    overrides = dict(spec.overrides)
    if spec.theta is not None:
        overrides["rope_theta"] = spec.theta
    if spec.factor is not None:
        overrides["factor"] = spec.factor
    return rope_for_length(base_config, stage.seq_len, spec.method, **overrides)


# --- optimizer and schedule --------------------------------------------------------------------


def make_optimizer(module, config: TrainConfig, stage: StageConfig, total_steps: int):
    parameters = [p for p in module.parameters() if p.requires_grad]
    settings = config.optimizer
    optimizer = torch.optim.AdamW(
        parameters, lr=stage.learning_rate, betas=tuple(settings.betas), eps=settings.eps,
        weight_decay=settings.weight_decay, foreach=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(stage, step, total_steps))
    return optimizer, scheduler


def lr_factor(stage: StageConfig, step: int, total_steps: int) -> float:
    """Linear warmup, then constant (EasyContext, Gradient) or cosine down to min_lr_ratio."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.lr_schedule == "constant":
        return 1.0
    progress = (step - stage.warmup_steps) / max(1, total_steps - stage.warmup_steps)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- one optimizer step ----------------------------------------------------------------------------


def train_step(module, optimizer, scheduler, micro_batches: list[dict], runtime: Runtime, grad_clip: float,
               precision: str = "float32") -> float:
    """Forward/backward over the micro-batches and one optimizer step; returns the step's mean loss.

    Each micro-batch (input_ids, position_ids, labels shifted in data.py) is zigzag-sharded over
    the sequence-parallel group (a group of one keeps it whole).
    """
    from longctx.parallel import shard_for_sequence_parallel

    # The loss is the mean over every valid token of the global batch: FSDP averages gradients over
    # all ranks, and each of a replica's sequence-parallel ranks counts that replica's whole batch.
    count = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro_batches)
    global_count = count
    if runtime.distributed:
        import torch.distributed as dist

        counted = torch.tensor([float(count)], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(counted)
        global_count = float(counted) / runtime.sp_size
    scale = runtime.world_size / max(global_count, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in micro_batches:
        batch = {key: value.to(runtime.device) for key, value in batch.items()}
        local = shard_for_sequence_parallel(batch, runtime.sp_rank, runtime.sp_size, labels_shifted=True)
        with torch.autocast(runtime.device.type, dtype=torch_dtype(precision), enabled=precision != "float32"):
            local_sum, _ = module(input_ids=local["input_ids"], position_ids=local["position_ids"],
                                  labels=local["shift_labels"])
        (local_sum * scale).backward()
        loss_sum += local_sum.detach().double().cpu()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if runtime.distributed:
        loss_sum = loss_sum.to(runtime.device)
        dist.all_reduce(loss_sum)
    return float(loss_sum) / max(global_count, 1)


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class RunPaths:
    output: Path
    checkpoints: Path


@dataclass
class Resume:
    """The saved state a resumed run starts from, the checkpoint directory holding it, and the
    data-parallel size its global batch was planned for."""

    state: ckpt.TrainState
    directory: Path
    data_parallel: int


@dataclass
class Run:
    """What stays fixed for a whole run: what every stage reads."""

    config: TrainConfig
    paths: RunPaths
    runtime: Runtime
    model_dir: Path
    model: torch.nn.Module  # the causal LM (PEFT-wrapped in lora mode)
    module: CausalLMLoss  # the model with the chunked loss, FSDP-sharded when distributed
    tokenizer: object
    progress: bool
    # the replicas the global batch (batch_size x gradient_accumulation x replicas) is planned for:
    # this launch's, or on resume the saved run's, so a resume on other replicas trains the same steps
    data_parallel: int

    def accumulation(self, stage: StageConfig) -> int:
        """Micro-batches per step on this launch's replicas that make the planned global batch."""
        return stage.gradient_accumulation * self.data_parallel // self.runtime.dp_size


def run_training(config: TrainConfig, paths: RunPaths, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, stop_after_steps: int | None = None, inputs: dict | None = None,
                 allow_pickle: bool = False) -> Path | None:
    """Train every stage and write the final model to paths.output. Returns it (None when stopped early).

    stop_after_steps ends the run after that many optimizer steps in this invocation, as a
    kill would (used to test that resuming reproduces an uninterrupted run).
    """
    from longctx.models import read_json, resolve_model

    start = check_run(config, paths, resume=resume, overwrite=overwrite, inputs=inputs)  # before the first write
    runtime = setup_runtime(config.parallel.sequence_parallel, config.parallel.ulysses)
    model_dir = resolve_model(config.model)
    base_config = read_json(model_dir / "config.json")
    check_parallel_fits_model(config.parallel, base_config, config.model)
    ropes = [stage_rope(base_config, stage) for stage in config.stages]  # plan every stage before any work
    model, tokenizer = load_model(model_dir, config, runtime, allow_pickle=allow_pickle)
    _prepare_checkpoint_dir(paths, start, overwrite=overwrite, runtime=runtime)

    module = CausalLMLoss(model, config.loss_chunk_size).to(runtime.device)
    if runtime.distributed:
        shard_module(module, runtime)
    torch.manual_seed(config.seed)
    run = Run(config, paths, runtime, model_dir, model, module, tokenizer, progress,
              start.data_parallel if start else runtime.dp_size)

    state = start.state if start else ckpt.TrainState()
    steps_left = stop_after_steps  # optimizer steps this invocation may still take (None: no limit)
    for index, stage in enumerate(config.stages):
        if index < state.stage or index == state.stage and state.stage_done:
            continue
        set_rope(model, ropes[index])
        optimizer, scheduler = make_optimizer(module, config, stage, stage.total_steps(run.data_parallel))
        if start and index == start.state.stage:
            ckpt.load_training_state(start.directory, module=module, optimizer=optimizer, scheduler=scheduler,
                                     rank=runtime.rank, world_size=runtime.world_size)
            log.info("resuming stage %d at step %d from %s", index + 1, state.step, start.directory)
        else:
            if start and index == start.state.stage + 1:  # the saved run had just finished the stage before
                ckpt.load_model_weights(start.directory, module, runtime.world_size)
            state.start_stage(index)
        start = None
        taken = run_stage(run, state, stage, ropes[index], optimizer, scheduler, steps_left)
        if taken is None:
            return None
        steps_left = None if steps_left is None else steps_left - taken
    final_stage = paths.checkpoints / f"stage-{len(config.stages)}-{config.stages[-1].seq_len}"
    if runtime.is_main:
        _write_final(final_stage, paths, config, state.schedule, model_dir, overwrite)
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()
    return paths.output


def run_stage(run: Run, state: ckpt.TrainState, stage: StageConfig, rope: dict, optimizer, scheduler,
              steps_left: int | None = None) -> int | None:
    """Train `state.stage` from `state.step` to its end, saving every checkpoint_every steps, then write
    the stage's model directory; returns the steps taken. None when `steps_left` ran out first (as a
    kill would)."""
    from tqdm.auto import tqdm

    config, runtime, index = run.config, run.runtime, state.stage
    stream = BatchStream(
        packed_rows(config.data, run.tokenizer, stage.seq_len, seed=config.seed + index, resume_from=state.data_resume),
        stage.batch_size, dp_rank=runtime.dp_rank, dp_size=runtime.dp_size, position=state.data_position,
        seeked=state.data_resume is not None,  # None: a fresh stage, or a source that cannot seek (replayed)
    )
    total = stage.total_steps(run.data_parallel)
    tokens_per_step = stage.tokens_per_step(run.data_parallel)
    bar = tqdm(total=total, initial=state.step, desc=f"stage {index + 1}/{len(config.stages)} @{stage.seq_len}",
               disable=not (run.progress and runtime.is_main), dynamic_ncols=True)
    stage_start, stage_start_step, losses = time.perf_counter(), state.step, []
    while state.step < total:
        if steps_left is not None and state.step - stage_start_step >= steps_left:
            bar.close()
            return None
        started = time.perf_counter()
        micro_batches = [stream.next_batch() for _ in range(run.accumulation(stage))]
        lr = scheduler.get_last_lr()[0]
        loss = train_step(run.module, optimizer, scheduler, micro_batches, runtime, config.optimizer.grad_clip,
                          config.precision)
        elapsed = time.perf_counter() - started
        state.step += 1
        state.global_step += 1
        state.tokens += tokens_per_step
        state.data_position, state.data_resume = stream.position, stream.resume_point
        losses.append(loss)
        tokens_per_s = tokens_per_step / elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if runtime.is_main and (state.step % config.logging.log_every == 0 or state.step == total):
            ckpt.append_metrics(run.paths.checkpoints, {
                "stage": index + 1, "seq_len": stage.seq_len, "step": state.step, "global_step": state.global_step,
                "loss": loss, "lr": lr, "tokens": state.tokens, "tokens_per_s": round(tokens_per_s, 1),
            })
        if state.step % config.logging.checkpoint_every == 0 and state.step < total:
            _save_state(run, state, optimizer, scheduler)
    bar.close()
    duration = time.perf_counter() - stage_start
    summary = {
        "stage": index + 1, "seq_len": stage.seq_len, "steps": total, "tokens": state.tokens,
        "learning_rate": stage.learning_rate, "batch_size": stage.batch_size,
        "gradient_accumulation": stage.gradient_accumulation, "rope": rope,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }
    state.schedule.append(summary)
    stage_dir = run.paths.checkpoints / f"stage-{index + 1}-{stage.seq_len}"
    _export_model(run, stage_dir, state.schedule)
    state.stage_done = True
    _save_state(run, state, optimizer, scheduler)
    if runtime.is_main:
        ckpt.append_metrics(run.paths.checkpoints, {"event": "stage_end", "global_step": state.global_step, **summary,
                                                    "seconds": round(duration, 1)})
        steps_done = state.step - stage_start_step
        log.info(
            "stage %d/%d done: seq_len %d, %d steps, %s tokens, loss %.4f, %.0f tokens/s, %.0f s; model in %s",
            index + 1, len(config.stages), stage.seq_len, total, f"{state.tokens:,}", summary["final_loss"] or float("nan"),
            steps_done * tokens_per_step / max(duration, 1e-9), duration, stage_dir,
        )
    return state.step - stage_start_step


def run_inputs(config: TrainConfig) -> dict:
    """What a run reads, which neither its output nor its checkpoints may overlap (check_output_free)."""
    from longctx.models.reference import reference_path
    from longctx.tasks.haystacks import haystack_path
    from longctx.train.config import resolve_data_files

    inputs = {"the model": reference_path(config.model)}
    if config.data.source == "files":
        inputs.update({f"training data {path}": Path(path) for path in resolve_data_files(config.data.paths)})
    elif config.data.source == "synthetic-passkey":
        inputs["the passkey haystack"] = haystack_path(config.data.passkey.haystack)
    return inputs


def check_run(config: TrainConfig, paths: RunPaths, *, resume: bool = False, overwrite: bool = False,
              inputs: dict | None = None) -> Resume | None:
    """Every check a run can make before it writes or loads anything: flags, the world size, the
    output and checkpoint locations against the inputs, the data source, and on --resume that the
    saved run has the config's stages. Returns the state to resume from (or None); writes nothing."""
    from longctx.models import check_output_free
    from longctx.train.data import check_data_source

    if resume and overwrite:
        raise LongctxError("--resume continues the run in the checkpoint directory and --overwrite discards it; "
                           "pass one of them")
    world_size = check_world(config.parallel.sequence_parallel)
    _check_parallel_fits(config)
    inputs = {**run_inputs(config), **(inputs or {})}
    check_output_free(paths.output, overwrite, inputs=inputs)
    check_output_free(paths.checkpoints, True, inputs=inputs)  # may exist: --resume continues it
    holds_run = paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir())
    if holds_run and not (resume or overwrite):
        raise LongctxError(
            f"checkpoint directory {paths.checkpoints} already holds a run; pass --resume to continue it "
            "or --overwrite to start over"
        )
    check_data_source(config.data)
    state_dir = ckpt.latest_state_dir(paths.checkpoints) if resume and paths.checkpoints.is_dir() else None
    if state_dir is None:
        return None
    state = ckpt.read_trainer_state(state_dir)
    saved = state.get("stages")
    wanted = stage_plan(config)
    if saved is not None and saved != wanted:
        changed = [f"stage {i + 1}" for i, (a, b) in enumerate(zip(saved, wanted)) if a != b]
        if len(saved) != len(wanted):
            changed.append(f"{len(saved)} stages saved, {len(wanted)} in the config")
        raise LongctxError(
            f"cannot resume {paths.checkpoints}: the config's stages differ from the saved run's ({', '.join(changed)}); "
            "use the config the run started with, or --overwrite to start over"
        )
    sp = config.parallel.sequence_parallel
    planned, replicas = state.get("data_parallel", state["world_size"] // sp), world_size // sp
    for stage in config.stages[state["stage"]:]:
        rows = stage.batch_size * stage.gradient_accumulation * planned
        if stage.gradient_accumulation * planned % replicas:
            raise LongctxError(
                f"cannot resume {paths.checkpoints} on {replicas} data-parallel replicas: the run's global batch of "
                f"{rows} rows a step (batch_size {stage.batch_size} x gradient_accumulation "
                f"{stage.gradient_accumulation} x {planned} replicas, stage at {stage.seq_len}) does not split into "
                f"{replicas}; launch {planned} replicas, or a number that divides "
                f"{stage.gradient_accumulation * planned}"
            )
    return Resume(ckpt.TrainState.from_json(state), state_dir, planned)


def _check_parallel_fits(config: TrainConfig) -> None:
    """check_parallel_fits_model on a model whose config.json is on disk already (run_training checks
    the others once they are resolved)."""
    from longctx.models import read_json
    from longctx.models.reference import reference_path

    path = reference_path(config.model)
    if path is not None and (path / "config.json").is_file():
        check_parallel_fits_model(config.parallel, read_json(path / "config.json"), config.model)


def stage_plan(config: TrainConfig) -> list[dict]:
    """What a resumed run must share with the saved one: each stage's length, steps or tokens, and batch."""
    return [{"seq_len": stage.seq_len, "steps": stage.steps, "tokens": stage.tokens, "batch_size": stage.batch_size,
             "gradient_accumulation": stage.gradient_accumulation} for stage in config.stages]


def _prepare_checkpoint_dir(paths: RunPaths, start: Resume | None, *, overwrite: bool, runtime: Runtime) -> None:
    """Make the checkpoint directory ready once the model has loaded: emptied on --overwrite, and a
    resumed run's metrics cut back to its saved step."""
    if runtime.is_main and start is None and overwrite and paths.checkpoints.exists():
        import shutil

        shutil.rmtree(paths.checkpoints)
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()
    if runtime.is_main:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_states(paths.checkpoints)
        if start is None:
            (paths.checkpoints / ckpt.METRICS).unlink(missing_ok=True)
        else:
            ckpt.truncate_metrics(paths.checkpoints, start.state.global_step)


def _save_state(run: Run, state: ckpt.TrainState, optimizer, scheduler) -> None:
    runtime = run.runtime
    trainer_state = state.to_json(seed=run.config.seed, world_size=runtime.world_size, data_parallel=run.data_parallel,
                                  stages=stage_plan(run.config))
    ckpt.save_training_state(
        run.paths.checkpoints, module=run.module, optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state,
        rank=runtime.rank, world_size=runtime.world_size, keep=run.config.logging.keep_checkpoints,
    )


def _metadata(config: TrainConfig, schedule: list[dict], model_dir: Path, rope: dict) -> dict:
    return {
        "kind": "trained-model",
        "rope_parameters": rope["rope_parameters"],
        "max_position_embeddings": rope["max_position_embeddings"],
        "source_model": str(model_dir),
        "mode": config.mode,
        "precision": config.precision,
        "sequence_parallel": config.parallel.sequence_parallel,
        "ulysses": config.parallel.ulysses,
        "seed": config.seed,
        "stages": schedule,
    }


def _export_model(run: Run, dest: Path, schedule: list[dict]) -> None:
    """Write the stage's model directory (collective under FSDP: parameters are gathered one by one, rank 0 writes)."""
    config, runtime = run.config, run.runtime
    causal_lm = unwrap_causal_lm(run.model)
    saved_dtype = source_dtype(run.model_dir)
    causal_lm.config.dtype = saved_dtype
    rope = {"rope_parameters": causal_lm.config.rope_parameters,
            "max_position_embeddings": causal_lm.config.max_position_embeddings}
    ckpt.export_model_dir(dest, run.module, config=causal_lm.config, source_dir=run.model_dir,
                          metadata=_metadata(config, schedule, run.model_dir, rope), dtype=saved_dtype,
                          lora_scaling=config.lora.alpha / config.lora.r if config.mode == "lora" else None,
                          rank=runtime.rank, world_size=runtime.world_size)


def source_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the source model was saved in: trained weights are written back in it."""
    from longctx.models import read_json

    config = read_json(Path(model_dir) / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return torch_dtype(name) if name in DTYPE_NAMES else torch.float32


def _write_final(stage_dir: Path, paths: RunPaths, config: TrainConfig, schedule: list[dict], model_dir: Path,
                 overwrite: bool) -> None:
    """The output: the last stage's model directory (hard-linked), its metadata recording the whole schedule."""
    from longctx.models import atomic_output_dir, link_or_copy
    from longctx.models.metadata import read_metadata, write_metadata

    metadata = read_metadata(stage_dir)
    with atomic_output_dir(paths.output, overwrite=overwrite) as tmp:
        for path in sorted(stage_dir.iterdir()):
            if path.is_file() and path.name != "longctx.json":
                link_or_copy(path, tmp / path.name)
        fields = {key: value for key, value in metadata.items() if key not in ("longctx_version", "kind")}
        fields["stages"] = schedule
        write_metadata(tmp, "trained-model", **fields)
        link_or_copy(paths.checkpoints / ckpt.METRICS, tmp / "train_log.jsonl")
    log.info("trained model written to %s", paths.output)
