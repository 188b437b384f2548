"""The whole journey, from the command line: does an extracted long-context adapter carry the long
context to a sibling fine-tune of the same base, and at which rank does that stop being true?

On the tiny Llama of benchmarks/progressive_passkey.py (2 layers, hidden 128, word-level
vocabulary over the passkey and skill prompts, native length 256):

1. BASE     `longctx train` from scratch at 256 on passkey documents (answer-only loss)
2. LONG     `longctx train --config configs/tiny-passkey.yaml --model BASE`: 512, then 1024 tokens (YaRN)
3. SIBLING  `longctx train` of BASE at 256 on --skill documents (default `reverse`: a hidden list of
            digits, asked backwards; or `multikey`, `single`...: RULER's "special magic number for
            KEY" needles, asked by key: a skill LONG lacks) mixed with passkey ones, native rope
4. ADAPTER  `longctx extract-lora BASE LONG --rank R` for each --ranks (full: the largest matrix
            side) and `--energy E` for each --energies
5. GRAFT    `longctx merge-adapters --base_model_name_or_path SIBLING --peft_model_paths ADAPTER`
            (and onto BASE: LONG reconstructed)
6. SCORES   `longctx needle`: passkey and the skill at 256 and 1024, 5 depths x --samples

Negative controls: SIBLING with LONG's rope settings only (`longctx extend`, no weights), and
SIBLING + a random adapter of the key rank (the extracted adapter's shapes, per-module ||BA||
and full-rank modules, random factors). The key rank is the smallest fixed rank at which the
grafted sibling reaches --goal-passkey at 1024 and keeps --goal-kept of its skill score at 256,
or the best rank when none does. --seeds beyond the first retrain LONG and SIBLING (from the same
BASE) with that seed and graft at the key rank, for the run-to-run spread.

How far each fine-tune moved (||X - BASE|| / ||BASE|| over the linear weights and over the rest,
and the cosine of LONG's and SIBLING's linear moves) is printed and kept in results.json under
"moves", per training seed: two fine-tunes' deltas add only while they are small.

BASE is scored first: under --min-base-passkey at the short length its pretraining did not take
(this depends on the seed), and the journey stops there with exit 2.

Every model, adapter and score lives under --work and is skipped when done, so the script can run
in pieces (a --work holds one skill's journey: a new skill needs its own, BASE included). The
table's columns name the skill; the output ends with one JSON line:
{"smallest_rank", "sibling_passkey_long", "sibling_skill_kept", "long_passkey_long",
 "base_passkey_long", "control_rope_only"}.

    .venv/bin/python benchmarks/journey.py --work out/journey --lock /tmp/longctx-heavy.lock

(--lock holds the shared machine's lock around each command rather than for the whole run.)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progressive_passkey import CONFIG as LONG_CONFIG  # noqa: E402
from progressive_passkey import NATIVE, PRETRAIN_STAGE, init_model  # noqa: E402

SKILL = "reverse"  # the sibling's skill unless --skill names another `longctx needle --task`
SKILLS = ("reverse", "needle", "single", "multikey", "multivalue", "multiquery")
EMBEDDINGS_SUFFIX = "-embeddings-"
DEPTHS = "0,25,50,75,100"
SIBLING_STAGE = dict(steps=600, learning_rate=1.0e-3, warmup_steps=30, lr_schedule="cosine",
                     batch_size=16)
# --*-lora-rank: `mode: lora` on every linear layer and nothing else trained (no embeddings, no
# norms), so the exported model's difference from BASE is low-rank per matrix and zero elsewhere
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_settings(rank: int) -> dict:
    """The config keys of a LoRA fine-tune of rank `rank` (alpha 2 * rank), merged into the weights at export."""
    return {"mode": "lora", "lora": {"r": rank, "alpha": 2.0 * rank, "target_modules": LORA_TARGETS, "trainable": []}}


class Journey:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = args.work
        self.results_path = self.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.results.setdefault("seconds", {})
        self.results.setdefault("scores", {})
        self.short, self.long_len = args.native, args.long_len
        self.skill = args.skill
        self.tasks = ("passkey", self.skill)  # what every model is scored on; BASE's vocabulary covers both
        self.results["skill"] = self.skill  # main() refused a --work holding another skill's journey

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=2, default=str))

    # --- running the CLI ------------------------------------------------------------------

    def longctx(self, step: str, *arguments: str) -> None:
        """One `longctx` command line, in a process of its own (or in this one with --in-process:
        the same parser and command, without the interpreter's start-up); its seconds are kept."""
        arguments = [str(a) for a in arguments]
        print("$ longctx", " ".join(arguments), flush=True)
        with heavy_lock(self.args.lock):
            started = time.perf_counter()
            code = self.run_command(arguments)
            seconds = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"longctx {arguments[0]} failed with exit code {code} (step {step})")
        self.results["seconds"][step] = round(seconds, 1)
        self.save()

    def run_command(self, arguments: list[str]) -> int:
        if self.args.in_process:
            from longctx.cli import main

            return main(arguments)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(self.args.threads)}
        return subprocess.run([sys.executable, "-m", "longctx", *arguments], env=env).returncode

    def train(self, step: str, config: dict, output: Path) -> Path:
        if not (output / "config.json").is_file():
            path = self.work / "configs" / f"{output.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            resume = ["--resume"] if (output.with_name(output.name + "-checkpoints") / "latest.json").is_file() else []
            self.longctx(step, "train", "--config", path, "--output", output, "--no-progress", *resume)
        return output

    # --- the models -----------------------------------------------------------------------

    def base(self) -> Path:
        if self.args.base is not None:
            return self.args.base
        init = self.work / "init"
        if not (init / "config.json").is_file():
            init_model(init, self.args.seeds[0], tasks=self.tasks)
        stage = dict(PRETRAIN_STAGE, steps=self.args.pretrain_steps)
        return self.train("train BASE", {
            "model": str(init), "seed": self.args.seeds[0],
            "data": {"source": "synthetic-passkey", "passkey": {"loss": "answer"}},
            "optimizer": {"weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0},
            "logging": {"log_every": 50, "checkpoint_every": 250}, "stages": [stage],
        }, self.work / "base")

    def long(self, base: Path, seed: int) -> Path:
        config = yaml.safe_load(self.args.long_config.read_text())
        if self.args.long_from_extend:
            base = self.extended(base, self.args.long_from_extend)
        config.update(model=str(base), seed=seed, logging={"log_every": 10, "checkpoint_every": 100})
        for stage, steps in zip(config["stages"], self.args.long_steps or [s["steps"] for s in config["stages"]]):
            stage["steps"] = steps
        for stage in config["stages"]:
            if self.args.long_lr is not None:
                stage["learning_rate"] = self.args.long_lr
            if self.args.long_rope:
                stage["rope"] = {"method": self.args.long_rope}
            if self.args.long_rope_theta is not None:
                stage["rope"] = {"theta": self.args.long_rope_theta}
        if self.args.long_lora_rank:
            config.update(lora_settings(self.args.long_lora_rank))
        return self.train(f"train LONG seed {seed}", config, self.work / suffixed("long", seed))

    def extended(self, model: Path, method: str, name: str = "base-extended", *options: str) -> Path:
        """`longctx extend --method METHOD --target-len LONG [options]` of model (rope only, no training)."""
        output = self.work / name
        if not (output / "config.json").is_file():
            output.parent.mkdir(parents=True, exist_ok=True)
            self.longctx(f"extend {name}", "extend", "--model", model, "--method", method, "--target-len", self.long_len,
                         "--output", output, *options)
        return output

    def long_method(self) -> str | None:
        """The rope method LONG's extension used: --long-from-extend, --long-rope, or its config's last stage's."""
        if self.args.long_from_extend or self.args.long_rope:
            return self.args.long_from_extend or self.args.long_rope
        return (yaml.safe_load(self.args.long_config.read_text())["stages"][-1].get("rope") or {}).get("method")

    def sibling(self, base: Path, seed: int) -> Path:
        """BASE fine-tuned at the native length on the skill (mixed with passkey), native rope; precision,
        data haystack and memory settings as LONG's config."""
        template = yaml.safe_load(self.args.long_config.read_text())
        settings = {key: template[key] for key in ("mode", "precision", "activation_checkpointing", "loss_chunk_size")
                    if key in template}
        haystack = template.get("data", {}).get("passkey", {}).get("haystack", "noise")
        stage = dict(SIBLING_STAGE, seq_len=self.short, steps=self.args.sibling_steps,
                     learning_rate=self.args.sibling_lr, batch_size=self.args.sibling_batch)
        if self.args.sibling_lora_rank:
            settings.update(lora_settings(self.args.sibling_lora_rank))
        return self.train(f"train SIBLING seed {seed}", {
            "model": str(base), "seed": seed, **settings,
            # passkey kept in the mix, as a fine-tune keeps its base's abilities
            "data": {"source": "synthetic-passkey", "passkey": {"loss": "answer", "haystack": haystack, "tasks": [self.skill, "passkey"]}},
            "optimizer": {"weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0},
            "logging": {"log_every": 50, "checkpoint_every": 200}, "stages": [stage],
        }, self.work / suffixed("sibling", seed))

    def adapter(self, base: Path, long: Path, choice: str, seed: int) -> Path:
        output = self.work / "adapters" / suffixed(choice, seed)
        if not (output / "adapter_config.json").is_file():
            value, _, policy = choice[1:].partition(EMBEDDINGS_SUFFIX)
            flag = ["--energy", value] if choice[0] == "e" else ["--rank", str(full_rank(base)) if value == "full" else value]
            flag += ["--embeddings", policy or "full"]
            output.parent.mkdir(parents=True, exist_ok=True)
            self.longctx(f"extract-lora {choice} seed {seed}", "extract-lora", base, long, "--output", output, *flag,
                         "--no-progress", "--workers", "1", "--device", self.args.device)
        return output

    def graft(self, model: Path, adapter: Path, name: str) -> Path:
        output = self.work / "merged" / name
        if not (output / "config.json").is_file():
            output.parent.mkdir(parents=True, exist_ok=True)
            self.longctx(f"merge-adapters {name}", "merge-adapters", "--base_model_name_or_path", model,
                         "--peft_model_paths", adapter, "--output_dir", output, "--device", self.args.device)
        return output

    def rope_only(self, sibling: Path, long: Path) -> Path:
        """SIBLING with LONG's rope settings and no weights: `longctx extend` with the method LONG
        was extended by (--long-from-extend, else its last stage's planned method, else its trained
        rope type); checked to agree with LONG."""
        long_config = json.loads((long / "config.json").read_text())
        rope = long_config["rope_parameters"]
        if self.args.long_rope_theta is not None:  # an explicit theta: ntk's --rope-theta writes exactly that
            output = self.extended(sibling, "ntk", "merged/sibling-rope-only", "--rope-theta", self.args.long_rope_theta)
        else:
            output = self.extended(sibling, self.long_method() or rope["rope_type"], "merged/sibling-rope-only")
        made = json.loads((output / "config.json").read_text())
        if (made["rope_parameters"], made["max_position_embeddings"]) != (rope, long_config["max_position_embeddings"]):
            raise SystemExit(f"extend wrote rope {made['rope_parameters']}, LONG has {rope}: the control would differ")
        return output

    def random_adapter(self, like: Path) -> Path:
        """An adapter of like's shapes, modules_to_save, config and rope sidecar, whose LoRA factors are
        random with each module's ||B A||_F equal to like's."""
        output = self.work / "adapters" / f"random-{like.name}"
        if (output / "adapter_config.json").is_file():
            return output
        import shutil

        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(like / "adapter_model.safetensors")
        generator = torch.Generator().manual_seed(self.args.seeds[0])
        for key_a in [key for key in tensors if ".lora_A." in key]:
            key_b = key_a.replace(".lora_A.", ".lora_B.")
            a, b = tensors[key_a], tensors[key_b]
            new_a = torch.randn(a.shape, generator=generator, dtype=torch.float32)
            new_b = torch.randn(b.shape, generator=generator, dtype=torch.float32)
            scale = torch.linalg.matrix_norm(b.float() @ a.float()) / torch.linalg.matrix_norm(new_b @ new_a)
            tensors[key_a], tensors[key_b] = new_a.to(a.dtype), (new_b * scale).to(b.dtype)
        partial = output.with_name(output.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(tensors, partial / "adapter_model.safetensors", metadata={"format": "pt"})
        for name in ("adapter_config.json", "longctx.json"):
            shutil.copy(like / name, partial / name)
        os.replace(partial, output)
        return output

    def arithmetic_reference(self, base: Path, long: Path, sibling: Path) -> Path:
        """SIBLING + (LONG - BASE) for every tensor, norms and embeddings included, with LONG's config:
        what a graft that adds every difference (instead of replacing modules_to_save) would give.
        A reference written here with safetensors, not a longctx command."""
        output = self.work / "merged" / "sibling-arithmetic"
        if (output / "config.json").is_file():
            return output
        import shutil

        from safetensors.torch import load_file, save_file

        weights = {name: load_file(model / "model.safetensors") for name, model in
                   (("base", base), ("long", long), ("sibling", sibling))}
        partial = output.with_name(output.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(sibling, partial)
        merged = {name: tensor + (weights["long"][name] - weights["base"][name])
                  for name, tensor in weights["sibling"].items()}
        save_file(merged, partial / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(long / "config.json", partial / "config.json")
        os.replace(partial, output)
        return output

    def record_moves(self, base: Path, long: Path, sibling: Path, seed: int) -> dict:
        """How far LONG and SIBLING moved from BASE, kept in results.json under moves["seed S"]
        (model_moves); printed, since two fine-tunes add only while their moves are small."""
        moves = self.results.setdefault("moves", {})[f"seed {seed}"] = model_moves(base, long, sibling)
        print(f"moves from BASE, seed {seed} (||X - BASE|| / ||BASE||, linear weights / the rest): "
              f"LONG {moves['LONG']['linear']:.3f} / {moves['LONG']['other']:.3f}, "
              f"SIBLING {moves['SIBLING']['linear']:.3f} / {moves['SIBLING']['other']:.3f}; "
              f"cosine of the linear moves {moves['cosine_linear']:.3f}", flush=True)
        self.save()
        return moves

    # --- scores ---------------------------------------------------------------------------

    def score(self, row: str, model: Path, tasks: tuple[str, ...] | None = None, needle_seed: int | None = None) -> dict:
        """{task@length: score} of `longctx needle` on model, each task (default passkey and the skill) once over both lengths."""
        tasks = self.tasks if tasks is None else tasks
        scores = self.results["scores"].setdefault(row, {})
        needle_seed = self.args.needle_seed if needle_seed is None else needle_seed
        for task in tasks:
            if f"{task}@{self.long_len}" in scores:
                continue
            output = self.work / "needle" / f"{model.name}-{task}{'' if needle_seed == self.args.needle_seed else f'-probes{needle_seed}'}"
            self.longctx(f"needle {row} {task}", "needle", "--model", model, "--task", task,
                         "--lengths", f"{self.short},{self.long_len}", "--depths", DEPTHS, "--samples", self.args.samples,
                         "--seed", needle_seed, "--device", self.args.device, "--output", output, "--overwrite")
            per_length = json.loads((output / "summary.json").read_text())["per_length"]
            for length, value in per_length.items():
                scores[f"{task}@{length}"] = float(value)
            self.save()
        return scores

    def adapter_facts(self, row: str, adapter: Path) -> None:
        summary = json.loads((adapter / "extraction_report.json").read_text())["summary"]
        self.results.setdefault("adapters", {})[row] = {
            "mb": summary["adapter_bytes"] / 1e6, "relative_error_mean": summary["relative_error_mean"],
            "relative_error_max": summary["relative_error_max"], "rank_mean": summary["rank_mean"],
            "rank_min": summary["rank_min"], "rank_max": summary["rank_max"]}
        self.save()

    # --- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        args, first = self.args, self.args.seeds[0]
        base = self.base()
        self.score("BASE", base)
        learned = self.results["scores"]["BASE"][f"passkey@{self.short}"]
        if learned < args.min_base_passkey:  # a seed whose pretraining did not take: the rest would measure nothing
            raise JourneyStopped(f"BASE scores {learned:.2f} on passkey at {self.short}, under --min-base-passkey "
                                 f"{args.min_base_passkey}: pretrain with another --seeds (or more --pretrain-steps) in a new --work")
        sibling = self.sibling(base, first)  # first: its skill's loss shows early whether the run is worth going on
        long = self.long(base, first)
        self.score("LONG", long)
        self.score("SIBLING", sibling)
        self.record_moves(base, long, sibling, first)
        ranked = [f"r{rank}{embeddings_suffix(policy)}" for rank in args.ranks for policy in args.embeddings]
        choices = ranked + [f"e{energy}{embeddings_suffix(policy)}" for energy in args.energies for policy in args.embeddings]
        for choice in choices:
            adapter = self.adapter(base, long, choice, first)
            self.adapter_facts(choice, adapter)
            self.score(f"SIBLING + {choice}", self.graft(sibling, adapter, f"sibling-{choice}"))
            self.score(f"BASE + {choice} (LONG rebuilt)", self.graft(base, adapter, f"base-{choice}"), ("passkey",))
        self.score("SIBLING, LONG's rope only", self.rope_only(sibling, long))
        key = key_choice(self.results["scores"], ranked, args.goal_passkey, args.goal_kept, self.short, self.long_len,
                         skill=self.skill)
        self.results["key_rank"] = key["choice"]
        random_adapter = self.random_adapter(self.work / "adapters" / suffixed(key["choice"], first))
        self.score(f"SIBLING + random {key['choice']}", self.graft(sibling, random_adapter, f"sibling-random-{key['choice']}"))
        if args.arithmetic_reference:
            self.score("SIBLING + (LONG - BASE), every tensor (reference)", self.arithmetic_reference(base, long, sibling))
        for needle_seed in args.spread_needle_seeds:
            for row, model in (("LONG", long), ("SIBLING", sibling), (f"SIBLING + {key['choice']}", self.work / "merged" / f"sibling-{key['choice']}")):
                self.score(f"{row} (probes seed {needle_seed})", model, needle_seed=needle_seed)
        for seed in args.seeds[1:]:
            long_s, sibling_s = self.long(base, seed), self.sibling(base, seed)
            self.score(f"LONG seed {seed}", long_s, ("passkey",))
            self.score(f"SIBLING seed {seed}", sibling_s)
            self.record_moves(base, long_s, sibling_s, seed)
            adapter = self.adapter(base, long_s, key["choice"], seed)
            self.adapter_facts(f"{key['choice']} seed {seed}", adapter)
            self.score(f"SIBLING + {key['choice']} seed {seed}",
                       self.graft(sibling_s, adapter, f"sibling-{suffixed(key['choice'], seed)}"))
        self.results["settings"] = {
            "skill": self.skill, "lengths": [self.short, self.long_len], "base": str(args.base or "pretrained here"),
            "long_config": str(args.long_config), "long_from_extend": args.long_from_extend, "long_rope": args.long_rope,
            "long_rope_theta": args.long_rope_theta, "long_lr": args.long_lr, "long_lora_rank": args.long_lora_rank, "sibling_lr": args.sibling_lr,
            "sibling_lora_rank": args.sibling_lora_rank, "seeds": args.seeds, "needle_seed": args.needle_seed, "spread_needle_seeds": args.spread_needle_seeds, "probes_per_cell": 5 * args.samples,
            "pretrain_steps": args.pretrain_steps, "sibling_steps": args.sibling_steps,
            "long_steps": args.long_steps or "configs/tiny-passkey.yaml", "threads": args.threads}
        self.save()
        scores = self.results["scores"]
        return {
            "smallest_rank": key["rank"], "sibling_passkey_long": key["passkey_long"],
            "sibling_skill_kept": key["skill_kept"], "long_passkey_long": scores["LONG"][f"passkey@{self.long_len}"],
            "base_passkey_long": scores["BASE"][f"passkey@{self.long_len}"],
            "control_rope_only": scores["SIBLING, LONG's rope only"][f"passkey@{self.long_len}"],
        }


@contextlib.contextmanager
def heavy_lock(path: Path | None):
    """Hold the shared machine's lock (flock) for one command, so other jobs run between steps."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embeddings_suffix(policy: str) -> str:
    """How a choice names extract-lora's --embeddings when it is not the default (full)."""
    return "" if policy == "full" else f"{EMBEDDINGS_SUFFIX}{policy}"


def suffixed(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}-seed{seed}"


def full_rank(model: Path) -> int:
    """The rank that keeps every linear layer's delta whole: the largest of their smaller sides."""
    config = json.loads((model / "config.json").read_text())
    return min(config["hidden_size"], config["intermediate_size"])


def model_moves(base: Path, long: Path, sibling: Path) -> dict:
    """{"LONG" | "SIBLING": {"linear": ||X - BASE|| / ||BASE|| over the linear layers' weights (LORA_TARGETS),
    "other": the same over every other tensor (embeddings, norms)}, "cosine_linear": the cosine of the two
    linear moves}, each norm over the part's tensors flattened together."""
    from safetensors.torch import load_file

    weights = {name: load_file(model / "model.safetensors") for name, model in
               (("BASE", base), ("LONG", long), ("SIBLING", sibling))}
    linear = sorted(name for name in weights["BASE"] if name.rsplit(".", 2)[-2] in LORA_TARGETS)
    other = sorted(name for name in weights["BASE"] if name not in set(linear))

    def flat(model: str, names: list[str]):
        import torch

        return torch.cat([weights[model][name].double().flatten() for name in names])

    result, deltas = {}, {}
    for model in ("LONG", "SIBLING"):
        result[model] = {}
        for part, names in (("linear", linear), ("other", other)):
            base_part = flat("BASE", names)
            delta = flat(model, names) - base_part
            result[model][part] = float(delta.norm() / base_part.norm())
            if part == "linear":
                deltas[model] = delta
    norms = deltas["LONG"].norm() * deltas["SIBLING"].norm()
    result["cosine_linear"] = float(deltas["LONG"] @ deltas["SIBLING"] / norms) if norms else 0.0
    return result


def skill_kept(scores: dict, row: str, short: int, skill: str = SKILL) -> float | None:
    """The grafted sibling's skill score at the short length as a fraction of the sibling's own
    (on the same probes)."""
    probes = row[row.index(" (probes seed"):] if " (probes seed" in row else ""
    own = scores[f"SIBLING{probes}"][f"{skill}@{short}"]
    return scores[row][f"{skill}@{short}"] / own if own else None


def key_choice(scores: dict, ranks: list[str], goal_passkey: float, goal_kept: float, short: int, long: int,
               skill: str = SKILL) -> dict:
    """The smallest rank whose graft meets both goals, else the best one (passkey at 1024, then skill)."""
    rows = []
    for choice in ranks:
        row = scores[f"SIBLING + {choice}"]
        rows.append({"choice": choice, "passkey_long": row[f"passkey@{long}"],
                     "skill_kept": skill_kept(scores, f"SIBLING + {choice}", short, skill)})
    for row in rows:
        if row["passkey_long"] >= goal_passkey and (row["skill_kept"] or 0.0) >= goal_kept:
            return {**row, "rank": row["choice"][1:].partition(EMBEDDINGS_SUFFIX)[0]}
    best = max(rows, key=lambda row: (row["passkey_long"], row["skill_kept"] or 0.0))
    return {**best, "rank": None}


def format_table(results: dict, short: int, long: int) -> str:
    """The markdown table: one row per model, scores per task (passkey and the sibling's skill, named)
    and length, the adapter's size and error."""
    skill = results.get("skill", SKILL)
    columns = [f"passkey@{short}", f"passkey@{long}", f"{skill}@{short}", f"{skill}@{long}"]
    lines = [f"| model | {' | '.join(columns)} | {skill} kept | adapter MB | extraction error (mean / max) |",
             "|---|" + "---|" * (len(columns) + 3)]
    adapters = results.get("adapters", {})
    for row, scores in results["scores"].items():
        cells = [f"{scores[c]:.2f}" if c in scores else "-" for c in columns]
        kept = skill_kept(results["scores"], row, short, skill) if f"{skill}@{short}" in scores and "SIBLING" in results["scores"] else None
        choice = row.split(" + ")[1].split(" (")[0] if " + " in row and "random" not in row else None
        choice = choice.replace(" (probes", "") if choice else None
        facts = adapters.get(choice)
        size = f"{facts['mb']:.2f}" if facts else "-"
        error = f"{facts['relative_error_mean']:.3f} / {facts['relative_error_max']:.3f}" if facts else "-"
        lines.append(f"| {row} | {' | '.join(cells)} | {f'{kept:.0%}' if kept is not None else '-'} | {size} | {error} |")
    return "\n".join(lines)


class JourneyStopped(Exception):
    """A journey that cannot measure anything past this point (the message says why and what to do)."""


def skill_problem(args: argparse.Namespace) -> str | None:
    """Why --skill cannot run here: --work holds another skill's journey (one from before --skill
    existed is reverse's), or --base's vocabulary lacks words of the skill's prompts (a word-level
    BASE made for another skill: its tokenizer would turn them into <unk>)."""
    results = args.work / "results.json"
    if results.is_file():
        held = json.loads(results.read_text())
        held = held.get("skill", SKILL if held.get("scores") else args.skill)
        if held != args.skill:
            return f"--work {args.work} holds a journey of --skill {held}, not {args.skill}: use another --work"
    if args.base is not None and (args.base / "config.json").is_file():
        from transformers import AutoTokenizer

        from longctx.train.data import passkey_documents

        tokenizer = AutoTokenizer.from_pretrained(args.base)
        if tokenizer.unk_token_id is not None:
            documents = passkey_documents(tokenizer, args.native, seed=0, tasks=(args.skill,))
            if any(tokenizer.unk_token_id in next(documents).ids for _ in range(20)):
                return (f"--base {args.base}'s vocabulary lacks words of {args.skill}'s prompts (<unk> in them): "
                        f"make a BASE with this --skill (leave out --base)")
    return None


def comma_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/journey"), help="working directory (resumable)")
    parser.add_argument("--base", type=Path, help="an existing BASE model (default: pretrain the tiny Llama here)")
    parser.add_argument("--skill", choices=SKILLS, default=SKILL,
                        help="the sibling's skill, a `longctx needle --task` (BASE's vocabulary is built over its prompts)")
    parser.add_argument("--native", type=int, default=NATIVE, help="the short length: SIBLING's training, scores")
    parser.add_argument("--long-len", type=int, default=4 * NATIVE, help="the long length: LONG's target, scores")
    parser.add_argument("--long-config", type=Path, default=LONG_CONFIG,
                        help="LONG's training config (its model and seed are set here)")
    parser.add_argument("--long-from-extend", metavar="METHOD",
                        help="train LONG from `longctx extend --method METHOD` of BASE (and extend the rope-only control so)")
    parser.add_argument("--ranks", type=comma_list, default=comma_list("4,8,16,32,64,full"), help="extract-lora --rank values")
    parser.add_argument("--energies", type=comma_list, default=comma_list("0.9,0.99"), help="extract-lora --energy values")
    parser.add_argument("--embeddings", type=comma_list, default=["full"],
                        help="extract-lora --embeddings policies, each at every rank and energy (e.g. full,lora)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="training seeds: the first for everything, the others for LONG + SIBLING at the key rank")
    parser.add_argument("--samples", type=int, default=4, help="needle samples per depth (5 depths) and length")
    parser.add_argument("--needle-seed", type=int, default=1)
    parser.add_argument("--spread-needle-seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="needle seeds (new probes) to score LONG, SIBLING and the key graft again with, for the spread")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STAGE["steps"])
    parser.add_argument("--long-steps", type=lambda s: [int(x) for x in s.split(",")],
                        help="steps of LONG's stages (default: configs/tiny-passkey.yaml's)")
    parser.add_argument("--long-lr", type=float, help="learning rate of every LONG stage (default: the config's)")
    parser.add_argument("--long-rope", metavar="METHOD",
                        help="rope method planned at every LONG stage instead of the config's (e.g. ntk)")
    parser.add_argument("--long-rope-theta", type=float, metavar="THETA",
                        help="an explicit rope_theta at every LONG stage instead of a planned method (the native theta: "
                             "no rope change, the long context in the weights alone)")
    parser.add_argument("--long-lora-rank", type=int, default=0,
                        help="train LONG as a LoRA of this rank on every linear layer, merged at export (0: the config's mode)")
    parser.add_argument("--sibling-lora-rank", type=int, default=0,
                        help="train SIBLING as a LoRA of this rank on every linear layer, merged at export (0: full fine-tune)")
    parser.add_argument("--sibling-steps", type=int, default=SIBLING_STAGE["steps"])
    parser.add_argument("--sibling-lr", type=float, default=SIBLING_STAGE["learning_rate"])
    parser.add_argument("--sibling-batch", type=int, default=SIBLING_STAGE["batch_size"])
    parser.add_argument("--min-base-passkey", type=float, default=0.5,
                        help="stop after BASE when its passkey at --native is under this (its pretraining did not take)")
    parser.add_argument("--goal-passkey", type=float, default=0.8, help="passkey at 1024 the graft must reach")
    parser.add_argument("--goal-kept", type=float, default=0.9, help="fraction of the sibling's skill it must keep")
    parser.add_argument("--device", default="cpu", help="--device of extract-lora, merge-adapters and needle (train picks CUDA itself)")
    parser.add_argument("--arithmetic-reference", action="store_true",
                        help="also score SIBLING + (LONG - BASE) over every tensor (a reference, not a longctx command)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per command")
    parser.add_argument("--lock", type=Path, help="a lock file held (flock) around each command, e.g. /tmp/longctx-heavy.lock")
    parser.add_argument("--in-process", action="store_true",
                        help="run each longctx command line in this process (tests: no interpreter start-ups)")
    args = parser.parse_args(argv)
    problem = skill_problem(args)
    if problem:
        parser.error(problem)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    journey = Journey(args)
    try:
        line = journey.run()
    except JourneyStopped as stopped:
        print(f"journey: {stopped}", file=sys.stderr)
        return 2
    print(f"\nseconds per step: {journey.results['seconds']}")
    print(f"\n{format_table(journey.results, args.native, args.long_len)}\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
