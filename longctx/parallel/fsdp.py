"""FSDP2 over a decoder stack: each decoder layer a unit of its own, the root module above them.

A unit's weights live on each rank as its 1/P shard; FSDP2 all-gathers a layer's for its forward
(and backward) and frees them after. `longctx train` shards the root's own weights (embeddings,
final norm, head) too; an evaluation across ranks keeps them whole (`shard_root=False`): the root's
weights are gathered for the whole forward, since the head runs last, so sharding them would add
their shard to the whole copy at the peak.
"""

from __future__ import annotations

import torch


def shard_decoder_layers(root: torch.nn.Module, layers, mesh, *, shard_root: bool = True) -> None:
    """fully_shard every module of `layers` over `mesh`, then `root` (the unit that holds the rest);
    with shard_root=False the root's own parameters stay whole on every rank (FSDP2's ignored_params),
    and the root is a unit only so that the layers free their gathered weights after each forward
    (FSDP2 keeps a root's gathered weights)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    ignored = None if shard_root else {p for p in root.parameters() if not isinstance(p, DTensor)}
    fully_shard(root, mesh=mesh, ignored_params=ignored)
    with torch.no_grad():  # off the checkpoint's memory map: while one tensor views it, every page read stays mapped
        for parameter in ignored or ():
            parameter.data = parameter.data.clone()
