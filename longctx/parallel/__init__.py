"""Sequence parallelism: zigzag sharding, ring attention, Ulysses and the hybrid, registered with
transformers as `longctx_ring`.

- `zigzag.py`: the zigzag layout and the batch helpers (padding, label shifting, sharding a batch);
- `ring.py`: ring attention over a process group (the block math is longctx/attention/'s);
- `ulysses.py`: the all-to-all over heads (DeepSpeed-Ulysses), with the ring across its groups;
- `groups.py`: the process groups (Ulysses groups and rings) that `longctx_ring` runs over;
- `loss.py`: the loss of a sharded sequence; `transformers_attention.py`: the registration.

Importing this package registers the attention implementation, so a stock model runs
sequence-parallel with `attn_implementation="longctx_ring"` given zigzag-sharded input_ids and the
matching global position_ids (see docs/parallel.md).

Imports: attention, labels, errors; never models/ (same level) or anything above.
"""

from longctx.parallel.groups import (
    SequenceParallelGroups,
    get_sequence_parallel_groups,
    new_sequence_parallel_groups,
    set_sequence_parallel_group,
    set_sequence_parallel_groups,
)
from longctx.parallel.loss import sequence_parallel_loss
from longctx.parallel.ring import BACKENDS, flash_attn_available, ring_attention
from longctx.parallel.transformers_attention import ATTENTION_NAME, register_with_transformers
from longctx.parallel.ulysses import ulysses_attention
from longctx.parallel.zigzag import (
    pad_for_zigzag,
    shard_for_sequence_parallel,
    shift_labels,
    zigzag_global_indices,
    zigzag_shard,
    zigzag_unshard,
)

register_with_transformers()

__all__ = [
    "ATTENTION_NAME",
    "BACKENDS",
    "SequenceParallelGroups",
    "flash_attn_available",
    "get_sequence_parallel_groups",
    "new_sequence_parallel_groups",
    "pad_for_zigzag",
    "ring_attention",
    "sequence_parallel_loss",
    "set_sequence_parallel_group",
    "set_sequence_parallel_groups",
    "shard_for_sequence_parallel",
    "shift_labels",
    "ulysses_attention",
    "zigzag_global_indices",
    "zigzag_shard",
    "zigzag_unshard",
]
