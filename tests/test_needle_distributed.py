"""The needle engine with its KV cache sharded across 2 and 4 gloo ranks (eval/sharded.py) gives one
process's logits, greedy tokens, answers and scores: chunked prefill (split and replicated passes),
prefix reuse, drafts, decode, teacher forcing, and dynamic NTK rotated as in one process."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_llama
from test_needle import AnswerOracle, oracle_answers
from test_parallel_ring import run_ranks

from longctx.eval.engine import PrefixCache, evaluation_mode, greedy_answer, new_cache, prefill
from longctx.eval.runner import Evaluator
from longctx.tasks.prompts import PromptBuilder
from longctx.tasks.haystacks import build_haystack
from longctx.tasks.retrieval import Task

LENGTH = 300
CHUNK = 37  # odd: pieces of unequal length; suffixes end in chunks shorter than 4 ranks (replicated passes)
CELLS = [(LENGTH, depth, 0) for depth in (0.0, 60.0, 100.0)] + [(290, 30.0, 1)]
ORACLE_LENGTH = 800
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def prefix_logits(model, tokenizer, sharding):
    """(logits, prefix cache): a haystack prefix built in chunks, cropped copies of it for prompts of
    several depths, the logits of the last 20 positions of each prompt's suffix."""
    task = Task("passkey")
    builder = PromptBuilder(tokenizer, build_haystack(tokenizer, "essays", LENGTH), task.instruction, "raw")
    prefix = PrefixCache(model, builder.clean_tokens, chunk_size=CHUNK, sharding=sharding)
    logits = {}
    with evaluation_mode(model, sharding), torch.no_grad():
        for depth in (50, 100, 10):  # the prefix grows, then is cropped
            prompt = builder.build(task.sample(random.Random(depth)), LENGTH, depth)
            cache, position = prefix.start(prompt.ids, prompt.shared_prefix, 8)
            logits[f"logits@{depth}"] = prefill(model, cache, prompt.ids[position:], chunk_size=CHUNK, keep=20)
    return logits, prefix


def mapped_files(model_dir) -> list[str]:
    """The files of model_dir that this process has memory-mapped."""
    from pathlib import Path

    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(model_dir) in line]


def load_on(model_dir, sharding):
    """The model and tokenizer; across ranks, with this rank holding its share of the decoder layers'
    weights (as `longctx needle --sequence-parallel` loads it), checked."""
    model, tokenizer = load(model_dir)
    if sharding is not None:
        from torch.distributed.tensor import DTensor

        from longctx.eval.sharded import shard_weights

        whole = {name: p.shape for name, p in model.named_parameters()}
        assert mapped_files(model_dir)  # the loader maps the checkpoint
        shard_weights(model, sharding)
        assert not mapped_files(model_dir)  # and no longer: pages read from it do not stay resident
        for name, p in model.named_parameters():
            if ".layers." in name:  # a row block of every layer weight, the rest whole
                assert isinstance(p, DTensor) and p.to_local().shape[0] == -(-whole[name][0] // sharding.size), name
            else:
                assert not isinstance(p, DTensor) and p.shape == whole[name], name
    return model, tokenizer


def engine_outputs(model_dir, sharding=None, dynamic_dir=None):
    """What the test compares, computed by one process (sharding None) or by every rank of a group
    (each holding its share of the KV cache and of the decoder weights)."""
    model, tokenizer = load_on(model_dir, sharding)
    outputs, prefix = prefix_logits(model, tokenizer, sharding)
    with evaluation_mode(model, sharding), torch.no_grad():
        ids = torch.randint(3, 250, (23,), generator=torch.Generator().manual_seed(1)).tolist()
        cache = prefix.new_cache() if sharding is not None else new_cache()
        outputs["logits 5+5+5+5+3"] = prefill(model, cache, ids, chunk_size=5, keep=3)
        # greedy decoding with a draft that is right for two tokens, then wrong
        nodraft = PrefixCache(model, ids, enabled=False, sharding=sharding)
        free = greedy_answer(model, tokenizer, nodraft, ids, 0, 12, first_line=False)
        outputs["greedy"] = free.text
        tokens = tokenizer.encode(free.text)
        drafted = greedy_answer(model, tokenizer, nodraft, ids, 0, 12, first_line=False,
                                draft=tokens[:2] + [(tokens[2] + 1) % 259] if len(tokens) > 2 else [5, 6, 7])
        outputs["greedy with draft"] = drafted.text
    for scoring in ("generate", "teacher-forced"):
        evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=LENGTH, scoring=scoring, chunk_size=CHUNK,
                              sharding=sharding)
        outputs[scoring] = [{key: value for key, value in evaluator.evaluate(*cell).to_json().items() if key != "seconds"}
                            for cell in CELLS]
        # an oracle model that answers: the scores 1 and 0.75 (one of four values wrong), in both scorings
        evaluator = Evaluator(model, tokenizer, Task("multivalue"), max_length=ORACLE_LENGTH, scoring=scoring,
                              chunk_size=3 * CHUNK, sharding=sharding)
        for wrong_piece in (None, 2):
            cells = [(ORACLE_LENGTH, 30.0, 0)]
            oracle = AnswerOracle(model, tokenizer.eos_token_id, *oracle_answers(evaluator, cells, wrong_piece=wrong_piece))
            try:
                result = evaluator.evaluate(*cells[0])
            finally:
                oracle.handle.remove()
            outputs[f"oracle {scoring} {wrong_piece}"] = (result.answer, result.score, result.processed_tokens)
    if sharding is not None:  # each rank holds its share: within a token of the others'
        for cache in (prefix.cache, cache):
            held = [cache.layout.held(rank) for rank in range(sharding.size)]
            assert max(held) - min(held) <= 1, held
    if dynamic_dir is not None:
        model, tokenizer = load_on(dynamic_dir, sharding)
        evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=LENGTH, scoring="generate", chunk_size=CHUNK,
                              sharding=sharding)
        outputs["dynamic"] = [{key: value for key, value in evaluator.evaluate(*cell).to_json().items() if key != "seconds"}
                              for cell in CELLS[:2]]
    return outputs


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, **TOLERANCE, msg=name)
        else:
            assert got[name] == value, name


def _ranks_match(rank, world_size, model_dir, dynamic_dir, expected):
    from longctx.eval.sharded import Sharding

    got = engine_outputs(model_dir, Sharding.of(), dynamic_dir)
    assert_same(got, expected)  # every rank, not only rank 0: they must all act on the same logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    # larger initial weights than the default make attention peaked: a wrong key set shows in the logits
    model_dir = make_tiny_llama(root / "tiny", initializer_range=0.1)
    dynamic_dir = make_tiny_llama(root / "dynamic", initializer_range=0.1, max_position_embeddings=128,
                                  rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    return model_dir, dynamic_dir


@pytest.fixture(scope="module")
def one_process(models):
    return engine_outputs(models[0], None, models[1])


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_engine_equals_one_process(models, one_process, world_size):
    assert one_process["generate"][0]["processed_tokens"] < LENGTH  # the prefix was reused
    assert one_process["dynamic"][0]["processed_tokens"] == LENGTH  # not with dynamic NTK
    assert [one_process[f"oracle {scoring} {wrong}"][1] for scoring in ("generate", "teacher-forced")
            for wrong in (None, 2)] == [1.0, 0.75, 1.0, 0.75]
    run_ranks(world_size, _ranks_match, *models, one_process)


def _dropped_partial_is_caught(rank, world_size, model_dir, expected):
    """Negative control: rank 1's partial attention dropped from the combine, the logits comparison fails."""
    import longctx.eval.sharded as sharded

    real = sharded.local_partial

    def dropping(*args):
        out, lse = real(*args)
        return (out.zero_(), lse.fill_(float("-inf"))) if rank == 1 else (out, lse)

    sharded.local_partial = dropping
    logits, _ = prefix_logits(*load(model_dir), sharded.Sharding.of())
    with pytest.raises(AssertionError, match="logits@"):
        assert_same(logits, {name: value for name, value in expected.items() if name in logits})


def _corrupted_weight_shard_is_caught(rank, world_size, model_dir, expected):
    """Negative control: rank 1's shard of one layer weight zeroed, the logits comparison fails (the
    layers run on the weights gathered from every rank's shard)."""
    from longctx.eval.sharded import Sharding

    sharding = Sharding.of()
    model, tokenizer = load_on(model_dir, sharding)
    if rank == 1:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.to_local().zero_()
    logits, _ = prefix_logits(model, tokenizer, sharding)
    with pytest.raises(AssertionError, match="logits@"):
        assert_same(logits, {name: value for name, value in expected.items() if name in logits})


def test_the_comparison_fails_with_a_wrong_weight_shard(models, one_process):
    run_ranks(2, _corrupted_weight_shard_is_caught, models[0], one_process)


def test_the_comparison_fails_without_one_ranks_partial(models, one_process):
    run_ranks(2, _dropped_partial_is_caught, models[0], one_process)


def test_gqa_without_a_gqa_kernel_gives_one_call_per_group_member(monkeypatch):
    """CUDA kernels take as many key/value heads as query heads: _attend splits the query heads by
    their place in each group and equals the kernel that does GQA itself."""
    import longctx.eval.sharded as sharded

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 7, 16, generator=generator)
    k, v = (torch.randn(1, 2, 7, 16, generator=generator) for _ in range(2))
    for causal in (True, False):
        expected = sharded._attend("math", q, k, v, 0.25, causal)
        monkeypatch.setattr(sharded, "_GQA_KERNELS", ())
        got = sharded._attend("math", q, k, v, 0.25, causal)
        monkeypatch.undo()
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(got[0], reference, rtol=1e-5, atol=1e-5)


def test_the_attention_runs_only_in_the_engines_passes(models):
    from longctx.errors import LongctxError
    from longctx.eval.sharded import ATTENTION_NAME, register_with_transformers

    model, _ = load(models[0])
    register_with_transformers()
    model.set_attn_implementation(ATTENTION_NAME)
    with pytest.raises(LongctxError, match="attn_implementation='sdpa'"):
        model(torch.tensor([[5, 6, 7]]))


# --- the CLI: torchrun --nproc-per-node P -m longctx needle ... --sequence-parallel P --------------

CLI_GRID = ["--lengths", "300,290", "--depths", "0,100", "--samples", "1", "--haystack", "essays", "--chunk-size", "37"]


def test_torchrun_grid_resumes_a_one_process_run_and_writes_what_one_process_writes(models, tmp_path):
    """One process runs the grid; its last two samples are dropped (one half-written) and two torchrun
    ranks resume it: every row and the summary equal the one-process run's, only rank 0 writes and
    prints."""
    import json
    import os
    import subprocess
    import sys

    from longctx.cli import main
    from longctx.eval.grid import read_results

    output = tmp_path / "run"
    command = ["needle", "--model", str(models[0]), *CLI_GRID, "--output", str(output)]
    assert main(command) == 0
    whole = read_results(output / "results.jsonl")
    summary = json.loads((output / "summary.json").read_text())
    lines = (output / "results.jsonl").read_text().splitlines()
    (output / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:25])
    (output / "summary.json").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "longctx",
         *command, "--sequence-parallel", "2", "--resume"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("effective length") == 1  # rank 0 alone reports
    resumed = read_results(output / "results.jsonl")
    assert len(resumed) == len(whole) == 4
    without_time = [{key: value for key, value in row.items() if key != "seconds"} for row in whole]
    assert [{key: value for key, value in row.items() if key != "seconds"} for row in resumed] == without_time
    again = json.loads((output / "summary.json").read_text())
    assert {key: value for key, value in again.items() if key != "seconds"} == {
        key: value for key, value in summary.items() if key != "seconds"}
    assert (output / "heatmap.png").is_file() and sorted(p.name for p in output.iterdir()) == [
        "heatmap.png", "results.jsonl", "settings.json", "summary.json"]


def _suite_on_ranks(rank, world_size, argv):
    import os

    import longctx.eval.sharded as sharded_module
    from longctx.cli import main
    from longctx.eval.sharded import _sharded_cache_class

    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun sets
    cache_class, passes, sharded = _sharded_cache_class(), [], []
    run, shard_weights = cache_class.run, sharded_module.shard_weights
    cache_class.run = lambda self, *args, **kwargs: passes.append(1) or run(self, *args, **kwargs)
    sharded_module.shard_weights = lambda model, sharding: sharded.append(1) or shard_weights(model, sharding)
    try:
        assert main(argv) == 0
    finally:
        cache_class.run, sharded_module.shard_weights = run, shard_weights
    assert passes  # every pass went through the sharded cache
    assert sharded == [1]  # over the decoder weights sharded across the ranks


def test_ruler_suite_across_ranks_writes_what_one_process_writes(models, tmp_path):
    """RULER's suite on two ranks (a needle task reusing its haystack prefix, variable tracking and QA
    without one), each pass through the sharded KV cache: every row and the summary equal one
    process's, and only rank 0 writes."""
    import json

    from longctx.cli import main
    from longctx.eval.grid import read_results
    from test_ruler import QA_DIR

    suite = ["needle", "--suite", "ruler", "--model", str(models[0]), "--lengths", "2500", "--samples", "1",
             "--tasks", "niah_single_1,vt,qa_1", "--qa-data", str(QA_DIR), "--chunk-size", "300"]
    assert main([*suite, "--output", str(tmp_path / "one")]) == 0
    run_ranks(2, _suite_on_ranks, [*suite, "--output", str(tmp_path / "two"), "--sequence-parallel", "2"])

    def without_time(rows):
        return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]

    one, two = (read_results(tmp_path / name / "results.jsonl") for name in ("one", "two"))
    assert len(one) == 3 and without_time(two) == without_time(one)
    assert any(row["shared_prefix"] > 0 for row in one)  # the needle task reused its prefix
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    for summary in summaries:
        summary.pop("seconds")
    assert summaries[0] == summaries[1]
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == [
        "heatmap.png", "results.jsonl", "settings.json", "summary.json"]


def test_sequence_parallel_is_refused_where_it_cannot_run(models, tmp_path, monkeypatch, capsys):
    """One line, exit 2, nothing written: a P that is not torchrun's world size (either way, for a grid
    and for RULER's suite), a Self-Extend model (refused from its config before the model loads), an attention the
    sharded cache cannot stand in for."""
    import json

    from longctx.cli import main
    from longctx.errors import LongctxError
    from longctx.eval.grid import NeedleSettings, load_for_run
    from longctx.eval.sharded import Sharding, sharded_attention

    output = tmp_path / "never"
    base = ["needle", "--model", str(models[0]), *CLI_GRID, "--output", str(output)]
    cases = [
        ([*base, "--sequence-parallel", "2"], {}, "launch with torchrun --nproc-per-node 2"),
        ([*base, "--sequence-parallel", "0"], {}, "at least 1"),
        (base, {"WORLD_SIZE": "2"}, "pass --sequence-parallel 2"),
        ([*base, "--sequence-parallel", "4"], {"WORLD_SIZE": "2"}, "pass --sequence-parallel 2"),
        (["needle", "--model", str(models[0]), "--suite", "ruler", "--lengths", "1k", "--output", str(output),
          "--sequence-parallel", "2"], {}, "launch with torchrun --nproc-per-node 2"),
    ]
    for argv, environment, message in cases:
        with monkeypatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            assert main(argv) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
        assert not output.exists()

    self_extend = tmp_path / "self-extend"
    make_tiny_llama(self_extend)
    config = json.loads((self_extend / "config.json").read_text())
    config["self_extend"] = {"group_size": 4, "window": 16}
    (self_extend / "config.json").write_text(json.dumps(config))
    with pytest.raises(LongctxError, match="Self-Extend.*drop --sequence-parallel"):
        load_for_run(NeedleSettings(model=str(self_extend)), output, {}, lengths=[300], chunk_size=37, reuse=True,
                     resume=False, overwrite=False, allow_pickle=False, sharding=Sharding(None, 1, 2))
    model, _ = load(models[0])
    model.config._attn_implementation = "longctx_self_extend"
    with pytest.raises(LongctxError, match="drop --sequence-parallel"), sharded_attention(model):
        pass
