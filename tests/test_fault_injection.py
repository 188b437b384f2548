"""SIGKILL at seeded points of every writing command, and what must hold afterwards.

Each kill runs the command in a forked child in which one function is wrapped to SIGKILL the
process on its k-th call: a write of bytes to a safetensors shard (killed half-way through the
bytes: mid-shard), the rename of a file or directory into place, an appended needle result (killed
half-way through the line), a training step, a tensor written into a training state by
torch.distributed.checkpoint. k is drawn with a fixed seed from the calls that an uninterrupted
in-process run of the same command made. After each kill: no output is visible
(atomic outputs) or only whole results are (needle's resumable output), the inputs are
byte-identical, and a rerun (--resume where the command has it) removes what the killed writer
left, says so, and gives the same result as the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama

import longctx.models.writer as writer_module
from longctx.cli import main

SEED = 14
KILLS_PER_POINT = 2


def tree_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


class Point:
    """A function to wrap: module attribute, and what to do at the kill (before calling it)."""

    def __init__(self, name, owner, attribute, partial=None):
        self.name, self.owner, self.attribute, self.partial = name, owner, attribute, partial

    def count_calls(self, monkeypatch) -> list[int]:
        calls = [0]
        original = getattr(self.owner, self.attribute)

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(self.owner, self.attribute, counting)
        return calls

    def kill_at(self, count: int) -> list[int]:
        """The seeded calls to kill at, out of count (the last one always: just before the end)."""
        rng = random.Random(f"{SEED}:{self.name}:{count}")
        picks = set(rng.sample(range(1, count + 1), min(count, KILLS_PER_POINT - 1)))
        return sorted(picks | {count})


def write_half(file, data) -> None:
    view = memoryview(data).cast("B")
    file.write(view[: max(1, len(view) // 2)])


def append_half(path, row) -> None:
    with open(path, "a") as stream:
        line = json.dumps(row) + "\n"
        stream.write(line[: len(line) // 2])


SHARD_WRITE = Point("shard-write", writer_module, "_write_all", partial=write_half)
RENAME = Point("rename", os, "replace")


def run_killed(argv: list[str], point: Point, k: int) -> None:
    """Run the command in a forked child that SIGKILLs itself on the k-th call of point."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            torch.set_num_threads(1)
            calls = [0]
            original = getattr(point.owner, point.attribute)

            def killing(*args, **kwargs):
                calls[0] += 1
                if calls[0] == k:
                    if point.partial is not None:
                        point.partial(*args)
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(*args, **kwargs)

            setattr(point.owner, point.attribute, killing)
            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point.name} #{k} not reached ({status})"
    print(f"killed: {argv[0]} at {point.name} #{k}")  # shown with -s: the kill points docs/promises.md counts


def hidden_leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from longctx.lora.extract import extract_lora

    root = tmp_path_factory.mktemp("fault-models")
    base = make_tiny_llama(root / "base", max_shard_size="60KB")
    tuned = make_tiny_llama(root / "tuned", seed=1)
    extract_lora(base, tuned, root / "adapter", rank=2, show_progress=False, workers=1)
    return root


def check_atomic_command(tmp_path, models, caplog, monkeypatch, argv_for, points, *, inputs, skip=()):
    """The uninterrupted run, then a kill at each seeded call of each point, each followed by a rerun."""
    reference = tmp_path / "reference"
    calls = {point.name: point.count_calls(monkeypatch) for point in points}
    assert main(argv_for(reference)) == 0
    monkeypatch.undo()
    expected = tree_hashes(reference, skip)
    before = {path: tree_hashes(path) for path in inputs}
    kills = 0
    for point in points:
        assert calls[point.name][0], f"the command never called {point.name}"
        for k in point.kill_at(calls[point.name][0]):
            output = tmp_path / f"out-{point.name}-{k}"
            run_killed(argv_for(output), point, k)
            kills += 1
            assert not output.exists(), f"{point.name} #{k}: a half-written output is visible"
            assert {path: tree_hashes(path) for path in inputs} == before
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                assert main(argv_for(output)) == 0
            left = hidden_leftovers(output)
            assert not left, left
            assert tree_hashes(output, skip) == expected, f"{point.name} #{k}: the rerun differs"
    return kills


def test_extend_killed_anywhere_leaves_nothing_and_reruns(tmp_path, models, caplog, monkeypatch):
    argv = lambda out: ["extend", "--model", str(models / "base"), "--target-len", "1k", "--output", str(out)]  # noqa: E731
    check_atomic_command(tmp_path, models, caplog, monkeypatch, argv, [RENAME], inputs=[models / "base"])


def test_overwrite_killed_at_any_rename_keeps_an_output(tmp_path, models, monkeypatch):
    """--overwrite over an existing output, killed at each rename: the output is always there, the old
    one or the new one, complete (on main a kill between its two renames left none)."""
    output = tmp_path / "extended"

    def argv(target_len):
        return ["extend", "--model", str(models / "base"), "--target-len", target_len, "--output", str(output),
                "--overwrite"]

    assert main(argv("1k")) == 0
    old = tree_hashes(output)
    assert main(argv("2k")) == 0
    new = tree_hashes(output)
    calls = RENAME.count_calls(monkeypatch)
    assert main(argv("1k")) == 0
    monkeypatch.undo()
    for k in range(1, calls[0] + 1):
        shutil.rmtree(output)
        assert main(argv("2k")) == 0  # the output to replace: the 2k one
        run_killed(argv("1k"), RENAME, k)
        assert output.is_dir() and tree_hashes(output) in (old, new), f"rename #{k}: no complete output"


def test_extract_lora_killed_mid_shard_or_rename(tmp_path, models, caplog, monkeypatch):
    def argv(out):
        return ["extract-lora", str(models / "base"), str(models / "tuned"), "--output", str(out), "--rank", "2",
                "--workers", "1", "--no-progress"]

    check_atomic_command(tmp_path, models, caplog, monkeypatch, argv, [SHARD_WRITE, RENAME],
                         inputs=[models / "base", models / "tuned"], skip=("extraction_report.json",))


def test_merge_adapters_killed_mid_shard_or_rename(tmp_path, models, caplog, monkeypatch):
    def argv(out):
        return ["merge-adapters", "--base-model", str(models / "base"), "--adapters", str(models / "adapter"),
                "--output", str(out), "--max-shard-size", "60KB"]

    check_atomic_command(tmp_path, models, caplog, monkeypatch, argv, [SHARD_WRITE, RENAME],
                         inputs=[models / "base", models / "adapter"])


def test_a_stale_leftover_is_reported_and_removed(tmp_path, models, caplog):
    """What the killed writer left is named in a warning by the next run over the same output."""
    output = tmp_path / "merged"
    argv = ["merge-adapters", "--base-model", str(models / "base"), "--adapters", str(models / "adapter"),
            "--output", str(output)]
    run_killed(argv, SHARD_WRITE, 2)
    left = hidden_leftovers(output)
    assert len(left) == 1 and left[0].startswith(".merged.tmp-")
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "left by an interrupted run" in caplog.text and left[0] in caplog.text
    assert not hidden_leftovers(output)


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    from longctx.models.output import remove_stale_temporaries, temporary_prefix

    live = tmp_path / (temporary_prefix(tmp_path / "out", "tmp") + "abcd1234")
    live.mkdir()  # this process is its writer, and alive
    foreign = tmp_path / ".out.tmp-1@another-host-abcd1234"
    foreign.mkdir()  # a writer on another host cannot be checked
    assert remove_stale_temporaries(tmp_path / "out") == []
    assert live.is_dir() and foreign.is_dir()


def test_needle_killed_mid_result_or_at_its_start_resumes_to_the_same_scores(tmp_path, models, monkeypatch):
    """Killed half-way through a result line, or half-way through the settings of a new run (on
    main that left a directory that could neither be resumed nor rerun without --overwrite)."""
    import longctx.eval.grid as grid

    def argv(out, *extra):
        return ["needle", "--model", str(models / "base"), "--lengths", "300,400", "--depths", "0,50,100",
                "--haystack", "essays", "--scoring", "teacher-forced", "--output", str(out), *extra]

    def write_half_text(path, text, *args, **kwargs):
        Path(path).open("w").write(text[: len(text) // 2])

    result = Point("result", grid, "append_result", partial=append_half)
    settings = Point("settings", Path, "write_text", partial=write_half_text)
    calls = result.count_calls(monkeypatch)
    assert main(argv(tmp_path / "reference")) == 0
    monkeypatch.undo()

    def scores(out):
        rows = grid.read_results(out / "results.jsonl")
        return sorted((r["length"], r["depth"], r["sample"], r["score"], r["answer"]) for r in rows)

    expected = scores(tmp_path / "reference")
    before = tree_hashes(models / "base")
    for point, k in [(settings, 1)] + [(result, k) for k in result.kill_at(calls[0])]:
        output = tmp_path / f"out-{point.name}-{k}"
        run_killed(argv(output), point, k)
        if point is settings:
            assert not output.exists()
        else:
            assert len(scores(output)) == k - 1  # the whole lines before the kill; the half line is dropped
        assert tree_hashes(models / "base") == before
        assert main(argv(output, "--resume")) == 0
        assert scores(output) == expected
        assert not hidden_leftovers(output)
        summary = json.loads((output / "summary.json").read_text())
        assert summary["mean_score"] == json.loads((tmp_path / "reference" / "summary.json").read_text())["mean_score"]


def test_train_killed_at_a_step_or_mid_checkpoint_resumes_to_the_same_model(tmp_path, models, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    import longctx.train.loop as loop

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "the quick brown fox " * (i % 5 + 2)}) + "\n"
                              for i in range(30)))

    def config_for(out):
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(models / "base"), "output": str(out), "seed": 3, "loss_chunk_size": 0,
            "data": {"source": "files", "paths": [str(corpus)]}, "logging": {"checkpoint_every": 2},
            "stages": [{"seq_len": 64, "steps": 5, "learning_rate": 1e-3, "batch_size": 1}],
        }))
        return ["train", "--config", str(path), "--no-progress"]

    # state-write: a tensor written into a state's temporary directory by torch.distributed.checkpoint
    points = [Point("step", loop, "train_step"), SHARD_WRITE, Point("state-write", dcp_filesystem, "_write_item")]
    calls = {point.name: point.count_calls(monkeypatch) for point in points}
    assert main(config_for(tmp_path / "reference")) == 0
    monkeypatch.undo()
    weights = ("model.safetensors", "config.json", "tokenizer_config.json")
    expected = {name: hashlib.sha256((tmp_path / "reference" / name).read_bytes()).hexdigest() for name in weights}
    before = tree_hashes(models / "base")
    for point in points:
        for k in point.kill_at(calls[point.name][0]):
            output = tmp_path / f"out-{point.name}-{k}"
            run_killed(config_for(output), point, k)
            assert not output.exists()
            assert tree_hashes(models / "base") == before
            assert main([*config_for(output), "--resume"]) == 0
            got = {name: hashlib.sha256((output / name).read_bytes()).hexdigest() for name in weights}
            assert got == expected, f"{point.name} #{k}: the resumed run differs"
            checkpoints = output.with_name(output.name + "-checkpoints")
            assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_default_model_conversion_killed_mid_shard_is_redone(tmp_path, monkeypatch, caplog):
    """The conversion into $LONGCTX_CACHE (a GGUF file's, the default model's path) killed mid-shard:
    the cache holds no entry, and the next resolve removes the leftover and converts again. The GGUF
    reader is replaced by a tiny model: what is under test is the conversion's write, not GGUF."""
    import transformers
    from conftest import make_tokenizer, tiny_llama_config

    from longctx.models.reference import resolve_model

    def tiny_model(*args, **kwargs):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(tiny_llama_config())

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: make_tokenizer())
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF-standing-in")
    gguf_bytes = gguf.read_bytes()
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "reference-cache"))
    expected = tree_hashes(resolve_model(gguf))
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)

            def killing(file, data):
                write_half(file, data)
                os.kill(os.getpid(), signal.SIGKILL)

            writer_module._write_all = killing
            resolve_model(gguf)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print("killed: conversion at shard-write #1")
    models_dir = tmp_path / "cache" / "models"
    assert [p.name[:1] for p in models_dir.iterdir()] == ["."]  # only the hidden leftover, no entry
    assert gguf.read_bytes() == gguf_bytes
    with caplog.at_level(logging.WARNING):
        converted = resolve_model(gguf)
    assert "left by an interrupted run" in caplog.text
    assert tree_hashes(converted) == expected
    assert [p.name for p in models_dir.iterdir()] == [converted.name]

