"""The process groups sequence parallelism runs over: set once per process, read by `longctx_ring`.

P sequence-parallel ranks with Ulysses degree U (U divides P) form P/U Ulysses groups of U
consecutive ranks (the all-to-all over heads: on GPUs, ranks of one node) and U rings of P/U ranks,
one through every U-th rank: sequence-parallel rank p = g*U + u is rank u of Ulysses group g and
rank g of ring u. Data, loss and position ids keep the P-way zigzag layout of the whole
sequence-parallel group for every U (see ulysses.py for why the rings then see a zigzag layout of
their own). U = 1 is the ring alone, U = P Ulysses alone (rings of one rank).

transformers calls attention functions with its own arguments, so the groups cannot be passed per
call; they are set here once after `dist.init_process_group`.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import LongctxError


@dataclass(frozen=True)
class SequenceParallelGroups:
    """ring: the group the ring runs over; ulysses: the all-to-all's group, None for the ring alone
    (then a ring of None is the WORLD group)."""

    ring: object = None
    ulysses: object = None


_groups = SequenceParallelGroups()


def set_sequence_parallel_group(group) -> None:
    """The process group the `longctx_ring` attention implementation rings over, without Ulysses
    (None: the WORLD group; a subgroup when sequence parallelism is combined with data parallelism)."""
    set_sequence_parallel_groups(SequenceParallelGroups(ring=group))


def set_sequence_parallel_groups(groups: SequenceParallelGroups) -> None:
    """The groups `longctx_ring` runs over: the ring alone, Ulysses alone, or the hybrid."""
    global _groups
    _groups = groups


def get_sequence_parallel_groups() -> SequenceParallelGroups:
    """The groups set with set_sequence_parallel_group(s); by default the ring over the WORLD group."""
    return _groups


def sequence_parallel_layout(world_size: int, sequence_parallel: int, ulysses: int) -> tuple[list, list]:
    """(Ulysses groups, rings) as lists of global ranks, for every data-parallel replica of
    `sequence_parallel` consecutive ranks."""
    if ulysses < 1 or sequence_parallel % ulysses or world_size % sequence_parallel:
        raise LongctxError(f"{world_size} ranks cannot form sequence-parallel groups of {sequence_parallel} "
                           f"with Ulysses groups of {ulysses}; the Ulysses degree must divide sequence_parallel, "
                           "and sequence_parallel the world size")
    ulysses_groups, rings = [], []
    for first in range(0, world_size, sequence_parallel):
        ranks = list(range(first, first + sequence_parallel))
        ulysses_groups += [ranks[start:start + ulysses] for start in range(0, sequence_parallel, ulysses)]
        rings += [ranks[offset::ulysses] for offset in range(ulysses)]
    return ulysses_groups, rings


def new_sequence_parallel_groups(sequence_parallel: int, ulysses: int = 1) -> SequenceParallelGroups:
    """This rank's ring and Ulysses group (None for ulysses 1); collective: every rank of the WORLD
    group calls it."""
    import torch.distributed as dist

    ulysses_groups, rings = sequence_parallel_layout(dist.get_world_size(), sequence_parallel, ulysses)
    ulysses_group = dist.new_subgroups_by_enumeration(ulysses_groups)[0] if ulysses > 1 else None
    ring = dist.new_subgroups_by_enumeration(rings)[0]
    return SequenceParallelGroups(ring=ring, ulysses=ulysses_group)
