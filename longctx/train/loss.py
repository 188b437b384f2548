"""Cross-entropy over the LM head in chunks, so [seq, vocab] logits never exist at once.

At 128K tokens and a 128K vocabulary the float32 logits alone are 64 GB. Here the base
model returns hidden states, the valid positions (label != -100) are gathered, and each
chunk of them is projected by the LM head and scored inside torch.utils.checkpoint: the
forward keeps only the chunk's scalar loss, and the backward recomputes one chunk's
logits at a time. Peak extra memory is chunk_size x vocab, whatever the sequence length.

Labels are already shifted (labels[i] is the target of position i; see train/data.py),
and the loss is returned as (sum over valid tokens, their count) so that sequence- and
data-parallel ranks and gradient-accumulation micro-batches can be combined exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longctx.labels import IGNORE_INDEX


def _logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (bfloat16 cross-entropy loses too much)."""
    logits = head(hidden)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = _logits(head, hidden)
    return F.cross_entropy(logits, labels, reduction="sum")


def plain_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: full logits, one cross-entropy. Returns (loss sum, valid-token count)."""
    logits = _logits(head, hidden)
    loss_sum = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


def chunked_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same value and gradients as plain_cross_entropy, with logits of at most chunk_size rows alive."""
    hidden = hidden.flatten(0, -2)
    labels = labels.flatten()
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    count = valid.new_tensor(valid.numel())
    hidden, labels = hidden.index_select(0, valid), labels.index_select(0, valid)
    # A zero that still depends on hidden, so backward reaches every parameter (even with no valid token,
    # as happens on a sequence-parallel rank whose shard holds no target).
    loss_sum = hidden.sum() * 0.0
    for start in range(0, labels.numel(), chunk_size):
        end = start + chunk_size
        loss_sum = loss_sum + checkpoint(_chunk_loss_sum, head, hidden[start:end], labels[start:end], use_reentrant=False)
    return loss_sum, count


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The *ForCausalLM module inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CausalLMLoss(nn.Module):
    """The trained module: a causal LM whose forward returns (loss sum, valid-token count).

    Wrapping the LM makes it one module for FSDP and activation checkpointing to work on,
    while the forward runs the decoder (`model.model`) and the chunked loss separately.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor):
        causal_lm = unwrap_causal_lm(self.model)
        hidden = causal_lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        head = causal_lm.get_output_embeddings()
        if self.chunk_size:
            return chunked_cross_entropy(hidden, head, labels, self.chunk_size)
        return plain_cross_entropy(hidden, head, labels)
