"""The causal-LM loss of a sequence sharded over a group: summed over valid tokens, divided by the global count."""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx.labels import IGNORE_INDEX


def sequence_parallel_loss(logits: torch.Tensor, shift_labels: torch.Tensor, group=None) -> torch.Tensor:
    """Mean cross-entropy over the valid tokens of the WHOLE sequence, from this rank's shard.

    logits [batch, seq_local, vocab], shift_labels [batch, seq_local] (already shifted, -100 = no
    loss; from shard_for_sequence_parallel). The sum of the per-token losses and the count of valid
    tokens are all-reduced over `group`. The returned value is the global mean on every rank; its
    gradient is this rank's share (local sum / global count), so the parameter gradients of the
    whole sequence are the SUM of the ranks' gradients (all-reduce with SUM, not average, over the
    sequence-parallel group).
    """
    local_sum = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    totals = torch.stack([local_sum.detach(), (shift_labels != IGNORE_INDEX).sum().to(local_sum)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, group=group)
    global_sum, count = totals[0], totals[1].clamp_min(1)
    return (local_sum + (global_sum - local_sum.detach())) / count
