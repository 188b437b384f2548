"""Benchmark: what each rope method does to the default model without training.

Extends the model to --target-len with every method (`longctx.models.extend.extend_model`),
then measures perplexity of one forward pass over the first N tokens of a long English
text (the GNU/Apache/GFDL/Artistic licenses concatenated, present on Debian/Ubuntu
machines), for N = a short length inside the native window and a long one beyond it. The
baseline is the unscaled model. Also prints each model's greedy chat answer to "What is
the capital of France?".

    flock /tmp/longctx-heavy.lock .venv/bin/python benchmarks/rope_methods_ppl.py --lengths 1024,12288
    (split with --only 'unscaled,ntk,...' to keep each run under the lock's 12 minutes)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

LICENSES = ["GPL-3", "GPL-2", "Apache-2.0", "GFDL-1.3", "Artistic"]
VARIANTS = [
    ("unscaled", None, {}),
    ("linear", "linear", {}),
    ("ntk", "ntk", {}),
    ("scaling-law", "scaling-law", {}),
    ("dynamic", "dynamic", {}),
    ("yarn", "yarn", {}),
    ("yarn attention_factor=1", "yarn", {"attention_factor": 1.0}),
    ("llama3", "llama3", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target-len", type=int, default=32768)
    parser.add_argument("--lengths", default="1024,12288", help="comma-separated token counts")
    parser.add_argument("--text-dir", default="/usr/share/common-licenses")
    parser.add_argument("--only", help="comma-separated labels to run (e.g. 'unscaled,ntk'); default all")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.models import resolve_model
    from longctx.models.extend import extend_model

    torch.manual_seed(0)
    text = "".join((Path(args.text_dir) / name).read_text() for name in LICENSES)
    lengths = [int(part) for part in args.lengths.split(",")]
    source = resolve_model(args.model)
    print(f"model {args.model}, target {args.target_len}, text {len(text)} chars, perplexity of one forward pass")
    print("| method | " + " | ".join(f"ppl @ {n}" for n in lengths) + " | answer: capital of France |")
    print("|---|" + "---|" * len(lengths) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, overrides in VARIANTS:
            if args.only and label not in args.only.split(","):
                continue
            start = time.perf_counter()
            model_dir = source
            if method is not None:
                model_dir = Path(tmp) / label.replace(" ", "_").replace(",", "")
                extend_model(source, model_dir, args.target_len, method, **overrides)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            cells = []
            for n in lengths:
                with torch.no_grad():
                    cells.append(f"{math.exp(model(ids[:, :n], labels=ids[:, :n]).loss.item()):.2f}")
            chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                 add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**chat, max_new_tokens=20, do_sample=False)
            answer = tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True).replace("\n", " ")
            print(f"| {label} | " + " | ".join(cells) + f" | {answer} |  <!-- {time.perf_counter() - start:.0f} s -->",
                  flush=True)


if __name__ == "__main__":
    main()
