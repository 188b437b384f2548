"""Perplexity by context length: how well a model predicts the first L tokens of a long text.

ppl(L) = exp(mean negative log-likelihood of tokens 2..L given the tokens before them), the
text cut to its first L tokens. With static rope scaling the prediction of token i does not
depend on anything after it, so one chunked pass over the longest length gives every
length at once (a prefix of the per-token losses). Dynamic NTK and LongRoPE change the
rotation with the sequence length, so each length gets its own chunked pass over exactly L
tokens, rotated as transformers rotates one forward pass of L tokens (eval/rotation.py).
"""

from __future__ import annotations

import logging
import math

import torch

from longctx.errors import LongctxError
from longctx.eval.cache import cache_keyword
from longctx.eval.engine import evaluation_mode, new_cache, prefix_reuse_supported
from longctx.eval.rotation import rotation_for_length
from longctx.units import length_label

log = logging.getLogger(__name__)

DEFAULT_PPL_CHUNK = 1024


@torch.no_grad()
def token_losses(model, ids: list[int], *, chunk_size: int = DEFAULT_PPL_CHUNK) -> torch.Tensor:
    """Negative log-likelihood of ids[1:], computed chunk by chunk on a KV cache (len(ids) - 1 values)."""
    cache = new_cache()
    losses = []
    device = model.device
    for start in range(0, len(ids) - 1, chunk_size):
        chunk = ids[start : start + chunk_size]
        logits = model(input_ids=torch.tensor([chunk], device=device), use_cache=True, **{cache_keyword(model): cache}).logits[0]
        targets = torch.tensor(ids[start + 1 : start + 1 + len(chunk)], device=device)
        losses.append(torch.nn.functional.cross_entropy(logits[: len(targets)].float(), targets, reduction="none"))
    return torch.cat(losses).cpu()


def perplexity_by_length(model, ids: list[int], lengths: list[int], *, chunk_size: int = DEFAULT_PPL_CHUNK) -> dict[int, float]:
    """{L: perplexity of ids[:L]} for each length (see the module docstring)."""
    lengths = sorted(set(lengths))
    if lengths[0] < 2:
        raise LongctxError("perplexity needs lengths of at least 2 tokens")
    if lengths[-1] > len(ids):
        raise LongctxError(
            f"the text has {len(ids)} tokens, fewer than the longest length {lengths[-1]}; give a longer --text"
        )
    with evaluation_mode(model):
        if prefix_reuse_supported(model.config):
            losses = token_losses(model, ids[: lengths[-1]], chunk_size=chunk_size)
            return {L: math.exp(losses[: L - 1].mean().item()) for L in lengths}
        log.info("length-dependent rope: one pass per length (the rotation depends on the sequence length)")
        by_length = {}
        for L in lengths:
            with rotation_for_length(model, L):
                by_length[L] = math.exp(token_losses(model, ids[:L], chunk_size=chunk_size).mean().item())
        return by_length


def format_ppl_table(results: dict[str, dict[int, float]], lengths: list[int]) -> str:
    """Lengths as rows, models as columns."""
    names = list(results)
    widths = [max(10, len(name)) for name in names]
    header = "length | " + " | ".join(name.rjust(w) for name, w in zip(names, widths))
    lines = [header, "-" * len(header)]
    for L in lengths:
        cells = [f"{results[name][L]:.3f}".rjust(w) for name, w in zip(names, widths)]
        lines.append(f"{length_label(L):>6} | " + " | ".join(cells))
    return "\n".join(lines)


def plot_ppl(results: dict[str, dict[int, float]], path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    for name, by_length in results.items():
        lengths = sorted(by_length)
        axes.plot(lengths, [by_length[L] for L in lengths], marker="o", label=name)
    lengths = sorted({L for by_length in results.values() for L in by_length})
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(lengths, [length_label(L) for L in lengths])
    axes.minorticks_off()
    axes.set_xlabel("Context length (tokens)")
    axes.set_ylabel("Perplexity")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
