"""How long a sequence one training step of SmolLM2-135M fits in CPU memory, and how fast it runs.

Three ways to run one training step (forward + backward, float32, sdpa attention, one sequence):

  transformers       `model(input_ids, labels=...)`, the stock causal-LM loss over full
                     [seq, vocab] logits, no activation checkpointing
  transformers-ckpt  the peer users actually run for long sequences: the same, after
                     `model.gradient_checkpointing_enable()`
  longctx            what `longctx train` runs: hidden states from `model.model`, chunked
                     cross-entropy (loss_chunk_size 4096) and activation checkpointing of every
                     decoder layer; against transformers-ckpt, the difference is the chunked loss

Each (way, length) runs in a fresh subprocess; a watchdog thread samples its RSS every 10 ms and
kills it above --cap-gib (the machine is shared: we never go near 24 GiB). A (way, length) whose
peak, predicted on the line through that way's measured points, exceeds --predict-above-gib is
not run: its peak is reported as predicted. The longest length fitting in 24 GiB is
extrapolated the same way (see memory_line), so the measured lengths should reach past the loss
chunk size (4096). --previous merges the JSON records of an earlier run (its output) so a long
measurement can be split over several runs (on a 2-core CPU the 8192-token longctx step alone
takes about 7 minutes):

    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/train_long.py \
        --memory-lengths 512,1024,2048,4096 --speed-lengths 4096 > run1.log
    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/train_long.py --previous run1.log
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

GIB = 1024**3
WAYS = ("transformers", "transformers-ckpt", "longctx")
PEERS = ("transformers", "transformers-ckpt")
BUDGET_GIB = 24.0


def child(way: str, length: int, cap_gib: float) -> None:
    """Run one training step and print {"rss_before", "rss_peak", "seconds", "cpu_seconds"} as JSON."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from longctx.models import resolve_model
    from longctx.train.loss import CausalLMLoss

    torch.manual_seed(0)
    process = psutil.Process()
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.train()
    module = model
    if way == "transformers-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if way == "longctx":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        module = CausalLMLoss(model, chunk_size=4096)
    input_ids = torch.randint(0, model.config.vocab_size, (1, length))
    positions = torch.arange(length).unsqueeze(0)
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)

    peak = [process.memory_info().rss]
    done = threading.Event()

    def watch():
        while not done.is_set():
            rss = process.memory_info().rss
            peak[0] = max(peak[0], rss)
            if rss > cap_gib * GIB:
                print(json.dumps({"capped": True, "rss_peak": rss}), flush=True)
                os._exit(3)
            time.sleep(0.01)

    rss_before = process.memory_info().rss
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    if way == "longctx":
        loss_sum, count = module(input_ids=input_ids, position_ids=positions, labels=labels)
        (loss_sum / count).backward()
    else:
        model(input_ids=input_ids, labels=input_ids, position_ids=positions, use_cache=False).loss.backward()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    done.set()
    thread.join()
    print(json.dumps({"rss_before": rss_before, "rss_peak": peak[0], "seconds": seconds, "cpu_seconds": cpu_seconds}), flush=True)


def measure(way: str, length: int, cap_gib: float, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--child", way, str(length), "--cap-gib", str(cap_gib)],
                            capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{way} at {length} failed: {result.stderr[-2000:]}")
    record = json.loads(lines[-1])
    record.update(way=way, length=length)
    return record


CHUNK = 4096  # the loss chunk size of the longctx way


def fitted_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (length, peak) points the memory line goes through.

    Past the loss chunk size (4096 tokens) nothing in one step grows faster than T on CPU: sdpa's
    CPU flash kernel keeps attention O(T), activations and logits (transformers) are O(T), and the
    chunked loss is capped at one chunk. So: the points at or past the chunk size when there are
    two or more, else the two longest.
    """
    points = sorted(points)
    past_chunk = [p for p in points if p[0] >= CHUNK]
    return past_chunk if len(past_chunk) >= 2 else points[-2:]


def memory_line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(intercept, bytes per token): the least-squares line of peak RSS against length through
    fitted_points, or None without two points."""
    fitted = fitted_points(points)
    if len(fitted) < 2:
        return None
    mean_t = sum(t for t, _ in fitted) / len(fitted)
    mean_m = sum(m for _, m in fitted) / len(fitted)
    slope = sum((t - mean_t) * (m - mean_m) for t, m in fitted) / sum((t - mean_t) ** 2 for t, _ in fitted)
    return mean_m - slope * mean_t, slope


def predict_peak(points: list[tuple[int, float]], length: int) -> float | None:
    line = memory_line(points)
    return None if line is None else line[0] + line[1] * length


def fit_max_length(points: list[tuple[int, float]], budget_bytes: float) -> int | None:
    """Largest T whose predicted peak stays under the budget (see memory_line)."""
    line = memory_line(points)
    if line is None or line[1] <= 0:
        return None
    return int((budget_bytes - line[0]) / line[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-lengths", default="512,1024,2048,4096,8192", help="lengths whose peak RSS is measured")
    parser.add_argument("--speed-lengths", default="4096,8192", help="lengths whose tokens/s is measured")
    parser.add_argument("--cap-gib", type=float, default=16.0, help="kill a measurement above this RSS")
    parser.add_argument("--predict-above-gib", type=float, default=16.0,
                        help="do not run a (way, length) whose peak RSS is predicted above this; report the prediction")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--previous", metavar="LOG", help="output of an earlier run whose records to reuse")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.cap_gib)
        return 0

    import torch

    memory_lengths = [int(x) for x in args.memory_lengths.split(",") if x]
    speed_lengths = [int(x) for x in args.speed_lengths.split(",") if x]
    records = {}
    if args.previous:
        with open(args.previous) as handle:
            for line in handle:
                if line.startswith("{") and '"way"' in line:
                    record = json.loads(line)
                    if not record.get("predicted"):  # predict again from this run's points
                        records[(record["way"], record["length"])] = record
    for length in sorted(set(memory_lengths) | set(speed_lengths)):
        for way in WAYS:
            if (way, length) in records:
                continue
            if any(w == way and t < length and r.get("capped") for (w, t), r in records.items()):
                records[(way, length)] = {"capped": True, "way": way, "length": length}
                continue
            measured = [(t, r["rss_peak"]) for (w, t), r in records.items() if w == way and "seconds" in r]
            predicted = predict_peak(measured, length)
            if predicted is not None and predicted > args.predict_above_gib * GIB:
                record = {"predicted": True, "rss_peak": predicted, "way": way, "length": length}
                records[(way, length)] = record
                print(json.dumps(record), flush=True)
                continue
            record = measure(way, length, args.cap_gib, args.threads)
            records[(way, length)] = record
            print(json.dumps(record), flush=True)

    print(f"\nSmolLM2-135M, one training step (forward + backward), float32, 1 sequence, CPU "
          f"({os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads), no GPU")
    def gib(record):
        if record.get("capped"):
            return "capped"
        return f"{record['rss_peak'] / GIB:.2f}" + (" (predicted, not run)" if record.get("predicted") else "")

    def sec(record):
        return f"{record['seconds']:.1f}" if "seconds" in record else "-"

    def ratio(peer, ours):
        if peer.get("capped") or ours.get("capped"):
            return "-"
        text = f"{peer['rss_peak'] / ours['rss_peak']:.2f}x"
        return text + (" (predicted)" if peer.get("predicted") or ours.get("predicted") else "")

    print("\n| length | " + " | ".join(f"{way} peak RSS (GiB)" for way in WAYS) + " | "
          + " | ".join(f"{peer} / longctx" for peer in PEERS) + " | " + " | ".join(f"{way} s" for way in WAYS) + " |")
    print("|---" * (2 * len(WAYS) + len(PEERS) + 1) + "|")
    for length in sorted({length for _, length in records}):
        row = [records[(way, length)] for way in WAYS]
        ours = records[("longctx", length)]
        print(f"| {length} | " + " | ".join(gib(r) for r in row) + " | "
              + " | ".join(ratio(records[(peer, length)], ours) for peer in PEERS) + " | "
              + " | ".join(sec(r) for r in row) + " |")

    summary = {}
    print(f"\nlongest sequence in {BUDGET_GIB:.0f} GiB (least-squares line through the measured points at or "
          f"past {CHUNK} tokens, else through the two longest):")
    for way in WAYS:
        points = [(length, r["rss_peak"]) for (w, length), r in records.items() if w == way and "seconds" in r]
        line = memory_line(points)
        longest = fit_max_length(points, BUDGET_GIB * GIB)
        summary[way] = longest
        if longest:
            used = [t for t, _ in fitted_points(points)]
            print(f"  {way}: {longest:,} tokens ({line[1] / 1024:.0f} KiB/token, line through {used})")
        else:
            print(f"  {way}: not enough points")
    for peer in PEERS:
        if summary.get(peer) and summary.get("longctx"):
            print(f"  ratio longctx / {peer}: {summary['longctx'] / summary[peer]:.1f}x")

    def speed(record: dict, length: int) -> str:
        return f"{length / record['seconds']:.0f}" if "seconds" in record else "not run"

    print("\ntokens/s (one step):")
    print("| length | " + " | ".join(WAYS) + " | " + " | ".join(f"longctx / {peer}" for peer in PEERS) + " |")
    print("|---" * (len(WAYS) + len(PEERS) + 1) + "|")
    for length in speed_lengths:
        row = [records[(way, length)] for way in WAYS]
        ours = records[("longctx", length)]
        speedups = [f"{records[(peer, length)]['seconds'] / ours['seconds']:.2f}x"
                    if "seconds" in records[(peer, length)] and "seconds" in ours else "-" for peer in PEERS]
        print(f"| {length} | " + " | ".join(speed(r, length) for r in row) + " | " + " | ".join(speedups) + " |")
    print(json.dumps({"max_tokens_24gib": summary,
                      "tokens_per_s": {str(l): {w: (l / records[(w, l)]["seconds"] if "seconds" in records[(w, l)] else None)
                                                for w in WAYS} for l in speed_lengths}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
