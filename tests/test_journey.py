"""benchmarks/journey.py's whole chain at tiny sizes (a few steps each, no quality claim): every
command runs, configs travel, the table and the JSON line come out, and a rerun skips it all."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
JSON_KEYS = ["smallest_rank", "sibling_passkey_long", "sibling_skill_kept", "long_passkey_long", "base_passkey_long",
             "control_rope_only"]


def load_journey():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("journey", ROOT / "benchmarks" / "journey.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def journey():
    return load_journey()


SMOKE = ["--ranks", "4,full", "--energies", "0.9", "--seeds", "0,1", "--spread-needle-seeds", "2", "--arithmetic-reference", "--samples", "1", "--pretrain-steps", "3",
         "--long-steps", "2,2", "--sibling-steps", "3", "--in-process", "--min-base-passkey", "0"]


@pytest.fixture(scope="module")
def smoke_run(journey, tmp_path_factory):
    """The whole chain once, pretraining included: (work directory, its stdout)."""
    work = tmp_path_factory.mktemp("journey") / "work"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert journey.main(["--work", str(work), *SMOKE]) == 0
    return work, output.getvalue()


def test_the_whole_chain_runs_from_the_cli_and_a_rerun_does_nothing(journey, smoke_run, capsys):
    work, out = smoke_run
    line = json.loads(out.strip().splitlines()[-1])
    assert list(line) == JSON_KEYS
    results = json.loads((work / "results.json").read_text())
    scores = results["scores"]
    assert line["long_passkey_long"] == scores["LONG"]["passkey@1024"]
    assert line["control_rope_only"] == scores["SIBLING, LONG's rope only"]["passkey@1024"]
    rows = ["BASE", "LONG", "SIBLING", "SIBLING + r4", "BASE + r4 (LONG rebuilt)", "SIBLING + rfull",
            "BASE + rfull (LONG rebuilt)", "SIBLING + e0.9", "BASE + e0.9 (LONG rebuilt)", "SIBLING, LONG's rope only",
            f"SIBLING + random {results['key_rank']}", "SIBLING + (LONG - BASE), every tensor (reference)", "LONG (probes seed 2)", "SIBLING (probes seed 2)",
            f"SIBLING + {results['key_rank']} (probes seed 2)", "LONG seed 1", "SIBLING seed 1", f"SIBLING + {results['key_rank']} seed 1"]
    assert list(scores) == rows
    for row in rows:
        assert all(0.0 <= value <= 1.0 for value in scores[row].values())
        assert {"passkey@256", "passkey@1024"} <= set(scores[row])
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == rows
    summary = json.loads((work / "needle" / f"sibling-{results['key_rank']}-passkey-probes2" / "summary.json").read_text())
    assert summary["settings"]["seed"] == 2
    assert results["adapters"]["rfull"]["relative_error_max"] < 1e-4 < results["adapters"]["r4"]["relative_error_mean"]

    long_config = json.loads((work / "long" / "config.json").read_text())
    for merged in ("sibling-r4", "base-e0.9", "sibling-rope-only", f"sibling-random-{results['key_rank']}"):
        config = json.loads((work / "merged" / merged / "config.json").read_text())
        assert config["rope_parameters"] == long_config["rope_parameters"] != {"rope_type": "default", "rope_theta": 1e4}
        assert config["max_position_embeddings"] == 1024

    # the reference adds every tensor's difference: on BASE itself it would be LONG
    arithmetic = load_file(work / "merged" / "sibling-arithmetic" / "model.safetensors")
    sibling, base_weights = load_file(work / "sibling" / "model.safetensors"), load_file(work / "base" / "model.safetensors")
    for name, tensor in arithmetic.items():
        torch.testing.assert_close(tensor - sibling[name], long_weights_of(work)[name] - base_weights[name], atol=1e-5, rtol=1e-4)

    # the full-rank adapter rebuilds LONG from BASE, tensor by tensor
    long_weights = load_file(work / "long" / "model.safetensors")
    rebuilt = load_file(work / "merged" / "base-rfull" / "model.safetensors")
    assert rebuilt.keys() == long_weights.keys()
    for name, tensor in long_weights.items():
        torch.testing.assert_close(rebuilt[name], tensor, atol=2e-5, rtol=1e-4)

    # the random control: the key adapter's shapes, modules_to_save and per-module ||BA||, other factors
    key = work / "adapters" / results["key_rank"]
    extracted, random = load_file(key / "adapter_model.safetensors"), load_file(work / "adapters" / f"random-{key.name}" / "adapter_model.safetensors")
    assert extracted.keys() == random.keys()
    for name in (n for n in extracted if ".lora_A." in n):
        b_name = name.replace(".lora_A.", ".lora_B.")
        product, random_product = extracted[b_name] @ extracted[name], random[b_name] @ random[name]
        torch.testing.assert_close(torch.linalg.matrix_norm(random_product), torch.linalg.matrix_norm(product))
        assert not torch.allclose(random_product, product)
    for name in (n for n in extracted if "lora_" not in n):
        assert torch.equal(extracted[name], random[name])

    # how far LONG and SIBLING moved from BASE, per training seed, checked against the weights themselves
    assert list(results["moves"]) == ["seed 0", "seed 1"]
    for seed, suffix in (("seed 0", ""), ("seed 1", "-seed1")):
        long_w, sibling_w = load_file(work / f"long{suffix}" / "model.safetensors"), load_file(work / f"sibling{suffix}" / "model.safetensors")
        linear = [n for n in base_weights if n.endswith("_proj.weight")]
        other = [n for n in base_weights if n not in linear]
        assert len(linear) == 14 and "model.embed_tokens.weight" in other

        def move(weights, names):
            delta = torch.cat([(weights[n] - base_weights[n]).double().flatten() for n in names])
            return delta, float(delta.norm() / torch.cat([base_weights[n].double().flatten() for n in names]).norm())

        moves = results["moves"][seed]
        for row, weights in (("LONG", long_w), ("SIBLING", sibling_w)):
            assert moves[row]["linear"] == pytest.approx(move(weights, linear)[1], rel=1e-6)
            assert moves[row]["other"] == pytest.approx(move(weights, other)[1], rel=1e-6)
            assert moves[row]["linear"] > 0
        d_long, d_sibling = move(long_w, linear)[0], move(sibling_w, linear)[0]
        assert moves["cosine_linear"] == pytest.approx(float(d_long @ d_sibling / d_long.norm() / d_sibling.norm()), rel=1e-6, abs=1e-9)
    assert "moves from BASE, seed 1" in out

    seconds = dict(results["seconds"])
    assert journey.main(["--work", str(work), *SMOKE]) == 0
    assert "$ longctx" not in capsys.readouterr().out
    assert json.loads((work / "results.json").read_text())["seconds"] == seconds


def test_the_gpu_variant_starts_from_a_given_base_and_trains_long_from_its_ntk_extension(journey, smoke_run, tmp_path):
    """benchmarks/gpu/journey.sh's path at tiny sizes: --base, a one-stage LONG config without a
    rope plan, trained from `longctx extend --method ntk`; the rope-only control is the same extension."""
    base = smoke_run[0] / "base"
    config = tmp_path / "long.yaml"
    config.write_text("model: x\nprecision: float32\nactivation_checkpointing: false\n"
                      "data: {source: synthetic-passkey, passkey: {loss: answer}}\n"
                      "stages: [{seq_len: 1024, steps: 2, learning_rate: 1.0e-3, batch_size: 2}]\n")
    work = tmp_path / "gpu-path"
    assert journey.main(["--work", str(work), "--base", str(base), "--long-config", str(config), "--long-from-extend", "ntk",
                         "--ranks", "8", "--energies", "", "--seeds", "0", "--samples", "1", "--sibling-steps", "2",
                         "--sibling-batch", "2", "--in-process", "--min-base-passkey", "0"]) == 0
    extended = json.loads((work / "base-extended" / "config.json").read_text())
    assert extended["rope_parameters"]["rope_theta"] > 1e4 and extended["max_position_embeddings"] == 1024
    for model in ("long", "merged/sibling-rope-only", "merged/sibling-r8"):
        config = json.loads((work / model / "config.json").read_text())
        assert config["rope_parameters"] == extended["rope_parameters"]
    assert json.loads((work / "results.json").read_text())["settings"]["base"] == str(base)
    assert not (work / "init").exists()


def long_weights_of(work: Path) -> dict:
    return load_file(work / "long" / "model.safetensors")


def scores_of(passkey_by_rank, skill_by_rank, sibling_skill=0.8):
    scores = {"SIBLING": {"reverse@256": sibling_skill}}
    for rank in passkey_by_rank:
        scores[f"SIBLING + r{rank}"] = {"passkey@1024": passkey_by_rank[rank], "reverse@256": skill_by_rank[rank]}
    return scores


def test_the_key_rank_is_the_smallest_meeting_both_goals_else_the_best(journey):
    scores = scores_of({4: 0.9, 8: 0.85, 16: 0.9}, {4: 0.6, 8: 0.76, 16: 0.8})
    key = journey.key_choice(scores, ["r4", "r8", "r16"], 0.8, 0.9, 256, 1024)
    assert (key["rank"], key["choice"], key["passkey_long"], key["skill_kept"]) == ("8", "r8", 0.85, pytest.approx(0.95))
    missed = journey.key_choice(scores_of({4: 0.5, 8: 0.7}, {4: 0.8, 8: 0.4}), ["r4", "r8"], 0.8, 0.9, 256, 1024)
    assert (missed["rank"], missed["choice"]) == (None, "r8")
    assert journey.key_choice(scores_of({4: 0.9}, {4: 0.0}, sibling_skill=0.0), ["r4"], 0.8, 0.9, 256, 1024)["rank"] is None


def test_small_moves_lora_siblings_and_a_gentler_long_rope(journey, smoke_run, tmp_path):
    """--sibling-lora-rank / --long-lora-rank: LoRA fine-tunes merged at export, so each model differs
    from BASE by a low-rank matrix per linear layer and nowhere else; --long-rope ntk / --long-lr replace
    the config's rope plan and learning rate at every LONG stage, and the rope-only control follows."""
    base = smoke_run[0] / "base"
    work = tmp_path / "small-moves"
    assert journey.main(["--work", str(work), "--base", str(base), "--long-rope", "ntk", "--long-lr", "3e-4",
                         "--long-steps", "2,2", "--long-lora-rank", "3", "--sibling-lora-rank", "2",
                         "--sibling-steps", "3", "--sibling-lr", "5e-3", "--ranks", "full", "--energies", "",
                         "--seeds", "0", "--samples", "1", "--in-process", "--min-base-passkey", "0"]) == 0
    import yaml

    long_config = yaml.safe_load((work / "configs" / "long.yaml").read_text())
    assert [stage["rope"] for stage in long_config["stages"]] == [{"method": "ntk"}] * 2
    assert [stage["learning_rate"] for stage in long_config["stages"]] == [3e-4] * 2
    sibling_config = yaml.safe_load((work / "configs" / "sibling.yaml").read_text())
    assert sibling_config["stages"][0]["learning_rate"] == 5e-3
    base_weights = load_file(base / "model.safetensors")
    for model, rank in (("sibling", 2), ("long", 3)):
        assert yaml.safe_load((work / "configs" / f"{model}.yaml").read_text())["lora"]["r"] == rank
        weights = load_file(work / model / "model.safetensors")
        moved = 0
        for name, tensor in weights.items():
            delta = tensor - base_weights[name]
            if name.endswith("proj.weight"):
                assert torch.linalg.matrix_rank(delta, atol=1e-6) <= rank, name
                moved += bool(delta.abs().max() > 0)
            else:  # embeddings and norms untouched
                assert torch.equal(tensor, base_weights[name]), name
        assert moved == 14, f"{model}: {moved} of 14 linear layers moved"
    long_rope = json.loads((work / "long" / "config.json").read_text())["rope_parameters"]
    assert long_rope["rope_type"] == "default" and long_rope["rope_theta"] > 1e4
    for merged in ("merged/sibling-rope-only", "merged/sibling-rfull"):
        assert json.loads((work / merged / "config.json").read_text())["rope_parameters"] == long_rope
    settings = json.loads((work / "results.json").read_text())["settings"]
    assert (settings["sibling_lora_rank"], settings["long_rope"], settings["long_lr"]) == (2, "ntk", 3e-4)


def test_an_explicit_long_theta_keeps_the_native_rope_and_the_control_follows(journey, smoke_run, tmp_path):
    """--long-rope-theta 10000 (the native theta): LONG learns 1024 tokens in its weights alone, with
    the rope unchanged but for max_position_embeddings; the rope-only control is `extend --method ntk
    --rope-theta 10000`, the same settings on the sibling's own weights."""
    base = smoke_run[0] / "base"
    work = tmp_path / "native-theta"
    assert journey.main(["--work", str(work), "--base", str(base), "--long-rope-theta", "10000", "--long-steps", "2,2",
                         "--sibling-steps", "2", "--sibling-batch", "2", "--ranks", "8", "--energies", "", "--seeds", "0",
                         "--samples", "1", "--in-process", "--min-base-passkey", "0"]) == 0
    import yaml

    stages = yaml.safe_load((work / "configs" / "long.yaml").read_text())["stages"]
    assert [stage["rope"] for stage in stages] == [{"theta": 10000.0}] * 2
    long_config = json.loads((work / "long" / "config.json").read_text())
    assert long_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert long_config["max_position_embeddings"] == 1024
    for merged in ("sibling-rope-only", "sibling-r8"):
        config = json.loads((work / "merged" / merged / "config.json").read_text())
        assert (config["rope_parameters"], config["max_position_embeddings"]) == (long_config["rope_parameters"], 1024)
    control, sibling = load_file(work / "merged" / "sibling-rope-only" / "model.safetensors"), load_file(work / "sibling" / "model.safetensors")
    assert all(torch.equal(control[name], tensor) for name, tensor in sibling.items())


def test_another_skill_runs_the_chain_with_its_own_base_vocabulary_and_names_it(journey, tmp_path, capsys):
    """--skill multikey (RULER's "special magic number for KEY" needles, asked by key): BASE's word
    vocabulary covers every key, SIBLING trains on multikey + passkey, every model is scored on
    multikey, and the table, results and settings name it; the JSON line keeps its keys."""
    work = tmp_path / "multikey"
    assert journey.main(["--work", str(work), "--skill", "multikey", "--ranks", "4", "--energies", "", "--seeds", "0",
                         "--samples", "1", "--pretrain-steps", "2", "--long-steps", "1,1", "--sibling-steps", "2",
                         "--sibling-batch", "2", "--in-process", "--min-base-passkey", "0"]) == 0
    out = capsys.readouterr().out
    assert list(json.loads(out.strip().splitlines()[-1])) == JSON_KEYS
    header = next(line for line in out.splitlines() if line.startswith("| model |"))
    assert "| multikey@256 | multikey@1024 | multikey kept |" in header and "reverse" not in header
    results = json.loads((work / "results.json").read_text())
    assert results["skill"] == results["settings"]["skill"] == "multikey"
    for row in ("BASE", "LONG", "SIBLING", "SIBLING + r4", "SIBLING, LONG's rope only", "SIBLING + random r4"):
        assert set(results["scores"][row]) == {"passkey@256", "passkey@1024", "multikey@256", "multikey@1024"}, row
    assert set(results["scores"]["BASE + r4 (LONG rebuilt)"]) == {"passkey@256", "passkey@1024"}
    import yaml

    sibling = yaml.safe_load((work / "configs" / "sibling.yaml").read_text())
    assert sibling["data"]["passkey"]["tasks"] == ["multikey", "passkey"]
    summary = json.loads((work / "needle" / "sibling-r4-multikey" / "summary.json").read_text())
    assert summary["settings"]["task"] == "multikey"

    from transformers import AutoTokenizer

    from longctx.train.data import passkey_documents

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    documents = passkey_documents(tokenizer, 256, seed=3, tasks=("multikey",))
    assert not any(tokenizer.unk_token_id in next(documents).ids for _ in range(50))  # keys come from 3,600 pairs


def test_a_skill_the_work_or_base_was_not_made_for_is_refused(journey, smoke_run, tmp_path, capsys):
    """A --work holding reverse's journey, or a --base whose word vocabulary was built for reverse,
    cannot run --skill multikey: one-line error, exit 2, nothing run or written."""
    work, _ = smoke_run
    before = (work / "results.json").read_text()
    for argv, message in ((["--work", str(work), "--skill", "multikey"], "holds a journey of --skill reverse"),
                          (["--work", str(tmp_path / "new"), "--base", str(work / "base"), "--skill", "multikey"],
                           "vocabulary lacks words of multikey's prompts"),
                          (["--work", str(tmp_path / "new"), "--skill", "passkey"], "invalid choice")):
        with pytest.raises(SystemExit) as raised:
            journey.main([*argv, *SMOKE])
        assert raised.value.code == 2
        assert message in capsys.readouterr().err
    assert (work / "results.json").read_text() == before
    assert not (tmp_path / "new").exists()


def test_the_skill_kept_is_read_from_the_skills_own_column(journey):
    scores = {"SIBLING": {"multikey@256": 0.8, "reverse@256": 0.0},
              "SIBLING + r8": {"passkey@1024": 0.9, "multikey@256": 0.76, "reverse@256": 0.0}}
    key = journey.key_choice(scores, ["r8"], 0.8, 0.9, 256, 1024, skill="multikey")
    assert (key["rank"], key["skill_kept"]) == ("8", pytest.approx(0.95))


def test_a_first_seed_other_than_0_finds_its_own_adapters(journey, smoke_run, tmp_path):
    """--seeds 1: the models and adapters are named with the seed (long-seed1, adapters/r8-seed1), and
    the random control is made from that adapter."""
    work = tmp_path / "seed1"
    assert journey.main(["--work", str(work), "--base", str(smoke_run[0] / "base"), "--ranks", "8", "--energies", "",
                         "--seeds", "1", "--samples", "1", "--long-steps", "1,1", "--sibling-steps", "2",
                         "--sibling-batch", "2", "--in-process", "--min-base-passkey", "0"]) == 0
    assert (work / "adapters" / "random-r8-seed1" / "adapter_model.safetensors").is_file()
    assert "SIBLING + random r8" in json.loads((work / "results.json").read_text())["scores"]


def test_a_base_that_did_not_learn_passkey_stops_the_journey(journey, smoke_run, tmp_path, capsys):
    """The smoke chain's 3-step BASE scores under the default --min-base-passkey: the journey stops
    after scoring it, one line, exit 2, before any SIBLING or LONG is trained."""
    work, _ = smoke_run
    base_passkey = json.loads((work / "results.json").read_text())["scores"]["BASE"]["passkey@256"]
    assert base_passkey < 0.5
    new = tmp_path / "gated"
    argv = ["--work", str(new), "--base", str(work / "base"), *SMOKE[:-2]]  # the default gate
    assert journey.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the scoring's progress bars
    assert last.startswith("journey: ") and f"BASE scores {base_passkey:.2f} on passkey at 256" in last
    assert not (new / "sibling").exists() and not (new / "long").exists()
    assert "BASE" in json.loads((new / "results.json").read_text())["scores"]
