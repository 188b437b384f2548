"""2 gloo ranks on CPU: sequence-parallel stages (zigzag ring attention + FSDP2, under torchrun)
give the 1-rank loss curve and weights, and a packed training step keeps documents apart on one
rank and on two."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama

from longctx.train.api import train_from_config
from longctx.train.checkpoint import read_metrics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n".join(f"Line {i}: " + "pack my box with five dozen liquor jugs. " * (i % 5 + 1) for i in range(60)))
    return path


def config_file(directory, model, corpus, sequence_parallel, ulysses=1):
    config = {
        "model": str(model),
        "output": str(directory / "out"),
        "seed": 2,
        "loss_chunk_size": 96,
        "parallel": {"sequence_parallel": sequence_parallel, "ulysses": ulysses},
        "data": {"source": "files", "paths": [str(corpus)]},
        "stages": [
            {"seq_len": 128, "steps": 3, "learning_rate": 3e-3, "batch_size": 2},
            {"seq_len": 256, "rope": {"method": "yarn"}, "steps": 2, "learning_rate": 2e-3, "gradient_accumulation": 2},
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun_train(config):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*TORCHRUN, "-m", "longctx", "train", "--config", str(config), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_losses(directory):
    return [m["loss"] for m in read_metrics(directory / "out-checkpoints" / "metrics.jsonl") if "loss" in m]


def test_two_rank_sequence_parallel_matches_one_rank(tmp_path, tiny_llama, corpus):
    from safetensors.torch import load_file

    train_from_config(config_file(tmp_path / "one", tiny_llama, corpus, 1), progress=False)
    result = torchrun_train(config_file(tmp_path / "ring", tiny_llama, corpus, 2))
    assert result.stdout.count("trained model:") == 1  # the summary comes from rank 0 only
    one, ring = step_losses(tmp_path / "one"), step_losses(tmp_path / "ring")
    assert len(one) == len(ring) == 5
    torch.testing.assert_close(torch.tensor(ring), torch.tensor(one), rtol=1e-5, atol=1e-5)
    a, b = load_file(tmp_path / "one" / "out" / "model.safetensors"), load_file(tmp_path / "ring" / "out" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    metadata = json.loads((tmp_path / "ring" / "out" / "longctx.json").read_text())
    assert metadata["sequence_parallel"] == 2 and metadata["rope_parameters"]["rope_type"] == "yarn"


# --- packed documents: one training step keeps documents apart, on one rank and on two --------------

PACKED_SEQ_LEN = 64
DOCUMENT_LENGTHS = (37, 50, 41)  # two rows of 64: [37 | 27 of 50], [the other 23 | 41]


def packed_batch():
    """Two packed rows as longctx.train.data makes them: positions restart per document, labels pre-shifted."""
    from longctx.train.data import Document, collate, pack_documents

    generator = torch.Generator().manual_seed(11)
    documents = [Document(torch.randint(3, 259, (n,), generator=generator).tolist()) for n in DOCUMENT_LENGTHS]
    return collate(list(pack_documents(documents, PACKED_SEQ_LEN)))


def segments(position_ids):
    """(row, start, end) of every document piece in the packed rows."""
    pieces = []
    for row, positions in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        pieces += [(row, a, b) for a, b in zip(starts, starts[1:])]
    return pieces


def step_config(model_dir, sequence_parallel, ulysses=1):
    from longctx.train.config import parse_config

    return parse_config({
        "model": str(model_dir), "activation_checkpointing": True, "loss_chunk_size": 48,
        "parallel": {"sequence_parallel": sequence_parallel, "ulysses": ulysses}, "data": {"source": "synthetic-passkey"},
        "stages": [{"seq_len": PACKED_SEQ_LEN, "steps": 1, "learning_rate": 1.0}],
    })


def reference_gradients(model_dir, batch, across_documents=False):
    """The mean-loss gradients of stock transformers: each document run on its own (or, with
    across_documents, whole rows attended causally across documents: an all-ones attention_mask
    turns off transformers' packed-sequence detection)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if across_documents:
        mask = torch.ones_like(batch["input_ids"])
        logits = [model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False).logits]
        labels = [batch["labels"]]
    else:
        pieces = segments(batch["position_ids"])
        logits = [model(batch["input_ids"][row:row + 1, a:b], use_cache=False).logits for row, a, b in pieces]
        labels = [batch["labels"][row:row + 1, a:b] for row, a, b in pieces]
    logits = torch.cat([x.flatten(0, 1) for x in logits])
    labels = torch.cat([y.flatten() for y in labels])
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def one_training_step(model_dir, batch, sequence_parallel, ulysses=1):
    """longctx's own step (load_model, CausalLMLoss, FSDP2 and ring attention (or Ulysses, or the hybrid)
    under sequence parallelism, train_step) with SGD at learning rate 1: returns (loss, the parameter
    update) on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from longctx.train.distributed import setup_runtime, shard_module
    from longctx.train.loop import load_model, train_step
    from longctx.train.loss import CausalLMLoss

    runtime = setup_runtime(sequence_parallel, ulysses)
    model, _ = load_model(model_dir, step_config(model_dir, sequence_parallel, ulysses), runtime)
    module = CausalLMLoss(model, chunk_size=48)
    before = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    if runtime.distributed:
        shard_module(module, runtime)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = train_step(module, optimizer, scheduler, [batch], runtime, grad_clip=0.0)
    after = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not runtime.is_main:
        return loss, None
    return loss, {name.removeprefix("model."): before[name] - after[name] for name in before}


def assert_update_is(update, expected_loss, expected_grads, loss):
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(update[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _two_rank_step(rank, world_size, model_dir, batch, expected_loss, expected_grads):
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets; setup_runtime reads it
    loss, update = one_training_step(model_dir, batch, sequence_parallel=2)
    if rank == 0:
        assert_update_is(update, expected_loss, expected_grads, loss)


def test_packed_documents_stay_apart_in_a_training_step_on_one_and_two_ranks(tmp_path):
    """The 1-rank step (sdpa: transformers reads restarting position_ids as packed sequences) and the
    2-rank step (zigzag ring attention + FSDP2) both equal the documents trained one by one."""
    from test_parallel_ring import run_ranks

    # larger initial weights than the default make attention peaked, so crossing documents shows
    model_dir = make_tiny_llama(tmp_path / "tiny", initializer_range=0.2)
    batch = packed_batch()
    assert len(segments(batch["position_ids"])) == 4  # a document is cut at the row end
    expected_loss, expected_grads = reference_gradients(model_dir, batch)
    _, crossing_grads = reference_gradients(model_dir, batch, across_documents=True)
    # attending across documents would be far outside the tolerances used below
    assert max((crossing_grads[n] - g).abs().max().item() for n, g in expected_grads.items()) > 1e-3

    loss, update = one_training_step(model_dir, batch, sequence_parallel=1)
    assert_update_is(update, expected_loss, expected_grads, loss)
    run_ranks(2, _two_rank_step, model_dir, batch, expected_loss, expected_grads)



def _data_parallel_step(rank, world_size, model_dir, batch, expected_loss, expected_grads):
    os.environ["WORLD_SIZE"] = str(world_size)
    replica_batch = {key: value[rank:rank + 1] for key, value in batch.items()}  # replica r trains on row r
    loss, update = one_training_step(model_dir, replica_batch, sequence_parallel=1)
    if rank == 0:
        assert_update_is(update, expected_loss, expected_grads, loss)


def test_data_parallel_replicas_with_unequal_token_counts_train_on_the_global_token_mean(tmp_path):
    """Two replicas, one row each, the second with most of its labels ignored: the step's loss and
    update are those of the mean over every valid token of both rows (transformers' loss over the
    whole batch), not the mean of the two rows' means, which is far outside the tolerance."""
    from test_parallel_ring import run_ranks

    model_dir = make_tiny_llama(tmp_path / "tiny", initializer_range=0.2)
    batch = packed_batch()
    batch["labels"][1, 8:] = -100  # row 0 keeps 63 valid labels, row 1 keeps 8
    expected_loss, expected_grads = reference_gradients(model_dir, batch)
    per_row = [reference_gradients(model_dir, {key: value[r:r + 1] for key, value in batch.items()}) for r in (0, 1)]
    mean_of_means = {name: (per_row[0][1][name] + per_row[1][1][name]) / 2 for name in expected_grads}
    assert max((mean_of_means[n] - g).abs().max().item() for n, g in expected_grads.items()) > 1e-3
    run_ranks(2, _data_parallel_step, model_dir, batch, expected_loss, expected_grads)

# --- sharded checkpoints: resume on the same world size and on others ------------------------------


def resume_config(directory, model, corpus, sequence_parallel):
    """One stage, a state every 2 steps; one data-parallel replica at every world size (the ranks
    form one sequence-parallel group), so every world size trains on the same global batch."""
    return {
        "model": str(model), "output": str(directory / "out"), "checkpoint_dir": str(directory / "checkpoints"),
        "seed": 4, "loss_chunk_size": 48, "parallel": {"sequence_parallel": sequence_parallel},
        "data": {"source": "files", "paths": [str(corpus)]}, "logging": {"checkpoint_every": 2},
        "stages": [{"seq_len": 64, "steps": 5, "learning_rate": 3e-3, "batch_size": 2}],
    }


def only_shards_reach_dcp():
    """Make this (forked) rank fail if a tensor of the model or of its optimizer state reaches
    dcp.save or dcp.load whole: FSDP2 holds every one as a DTensor sharded over the ranks."""
    from torch.distributed.tensor import DTensor, Shard

    from longctx.train import checkpoint as ckpt

    dcp = ckpt._dcp

    def checked(operation, tensors, path, world_size):
        for group in ("model", "optimizer"):
            for name, value in (tensors.get(group) or {}).items():
                for key, tensor in (value.items() if isinstance(value, dict) else [("", value)]):
                    if tensor.dim():  # (AdamW's step is a replicated scalar)
                        assert isinstance(tensor, DTensor) and isinstance(tensor.placements[0], Shard), \
                            f"{operation}: {group} {name} {key} is whole"
        return dcp(operation, tensors, path, world_size)

    ckpt._dcp = checked


def last_rank_writes_late(rank, world_size):
    """Delay the last rank's RNG file: rank 0 must wait for it before it publishes a state."""
    import time

    from longctx.train import checkpoint as ckpt

    if rank == world_size - 1:
        rng_state = ckpt.rng_state
        ckpt.rng_state = lambda: (time.sleep(0.2), rng_state())[1]


def export_streams_one_tensor_at_a_time():
    """Make this (forked) rank fail if the model export holds more than a few gathered parameters
    at once (a LoRA merge holds three: the weight, A and B)."""
    import weakref

    from longctx.train import checkpoint as ckpt

    whole, alive = ckpt._whole, []

    def counted(tensor):
        alive[:] = [ref for ref in alive if ref() is not None]
        assert len(alive) < 4, f"{len(alive)} gathered parameters alive at once"
        gathered = whole(tensor)
        alive.append(weakref.ref(gathered))
        return gathered

    ckpt._whole = counted


def train_ranks(rank, world_size, raw, resume=False, stop_after_steps=None):
    """run_training on one rank of world_size (world_size 1: this process, no torch.distributed)."""
    from longctx.train.config import parse_config
    from longctx.train.loop import RunPaths, run_training

    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets; setup_runtime reads it
    if world_size > 1:
        only_shards_reach_dcp()
        last_rank_writes_late(rank, world_size)
        export_streams_one_tensor_at_a_time()
    config = parse_config(raw)
    run_training(config, RunPaths(Path(config.output), Path(config.checkpoint_dir)), resume=resume,
                 stop_after_steps=stop_after_steps, progress=False)


def train_on(world_size, raw, resume=False, stop_after_steps=None):
    from test_parallel_ring import run_ranks

    if world_size == 1:
        train_ranks(0, 1, raw, resume, stop_after_steps)
        os.environ.pop("WORLD_SIZE")
    else:
        run_ranks(world_size, train_ranks, raw, resume, stop_after_steps)


def run_losses(directory):
    return [(m["global_step"], m["loss"]) for m in read_metrics(directory / "checkpoints" / "metrics.jsonl") if "loss" in m]


def test_sharded_state_resumes_exactly_on_two_ranks_and_within_1e5_on_one_and_four(tmp_path, tiny_llama, corpus):
    """Saved by 2 ranks (FSDP2: each writes its half of the model and optimizer), resumed on 2 ranks
    bit-exact, and on 1 and 4 ranks (DCP reshards) with the uninterrupted run's losses within 1e-5;
    the model directory, gathered one parameter at a time, loads in transformers with the weights
    of the last sharded state."""
    import shutil

    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    train_on(2, resume_config(whole, tiny_llama, corpus, 2))
    cut = tmp_path / "cut"
    train_on(2, resume_config(cut, tiny_llama, corpus, 2), stop_after_steps=3)  # the state of step 2 survives
    state = cut / "checkpoints" / "state-00000002"
    assert sorted(p.name for p in state.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "optimizer.json", "rng-0.json", "rng-1.json", "trainer_state.json"]
    sizes = [(state / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert max(sizes) < 0.7 * sum(sizes)  # each rank wrote its own shards, not the whole state
    # the streamed export loads in transformers and holds the weights of the run's last (sharded) state
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    dcp_to_torch_save(whole / "checkpoints" / "state-00000005", tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    exported = AutoModelForCausalLM.from_pretrained(whole / "out").state_dict()
    assert {f"model.{name}" for name in exported} == set(final)
    assert all(torch.equal(tensor, final[f"model.{name}"]) for name, tensor in exported.items())
    expected = run_losses(whole)
    assert [step for step, _ in expected] == [1, 2, 3, 4, 5]
    whole_weights = load_file(whole / "out" / "model.safetensors")
    for world_size in (2, 1, 4):
        resumed = tmp_path / f"resumed-{world_size}"
        shutil.copytree(cut, resumed)
        train_on(world_size, resume_config(resumed, tiny_llama, corpus, world_size), resume=True)
        got = run_losses(resumed)
        assert [step for step, _ in got] == [1, 2, 3, 4, 5]
        weights = load_file(resumed / "out" / "model.safetensors")
        if world_size == 2:
            assert got == expected
            assert all(torch.equal(weights[name], tensor) for name, tensor in whole_weights.items())
        else:
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)
            for name, tensor in whole_weights.items():
                torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_resume_on_fewer_replicas_accumulates_more_and_trains_the_same_steps(tmp_path, tiny_llama, corpus):
    """Saved by 2 data-parallel replicas (a row each per step), resumed in one process: it accumulates
    2 micro-batches a step, so every step still trains on the same 2 rows, and the losses and weights
    are the uninterrupted 2-replica run's within 1e-5. 4 replicas cannot split 2 rows: refused."""
    import shutil

    from safetensors.torch import load_file

    from longctx.errors import LongctxError
    from longctx.train.config import parse_config
    from longctx.train.loop import RunPaths, check_run

    def config(directory):
        raw = resume_config(directory, tiny_llama, corpus, 1)
        raw["stages"][0]["batch_size"] = 1
        return raw

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_on(2, config(whole))
    train_on(2, config(cut), stop_after_steps=3)  # the state of step 2 survives
    resumed = tmp_path / "resumed"
    shutil.copytree(cut, resumed)
    train_on(1, config(resumed), resume=True)
    got, expected = run_losses(resumed), run_losses(whole)
    assert [step for step, _ in got] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)
    weights, whole_weights = load_file(resumed / "out" / "model.safetensors"), load_file(whole / "out" / "model.safetensors")
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    parsed = parse_config(config(cut))
    os.environ["WORLD_SIZE"] = "4"
    try:
        with pytest.raises(LongctxError, match="global batch of 2 rows a step .* does not split into 4"):
            check_run(parsed, RunPaths(Path(parsed.output), Path(parsed.checkpoint_dir)), resume=True)
    finally:
        os.environ.pop("WORLD_SIZE")
