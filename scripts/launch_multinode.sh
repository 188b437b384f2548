#!/usr/bin/env bash
# Launch `longctx train` on several nodes with torchrun and c10d rendezvous.
# Run the same command on every node; torchrun assigns ranks when all nodes have joined.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.cluster:29500 RDZV_ID=llama3-1m \
#       scripts/launch_multinode.sh --config configs/llama3-8b-1m.yaml [--resume]
#
# Environment (defaults in brackets):
#   NNODES           number of nodes, or a MIN:MAX range for elastic jobs                 [1]
#   NPROC_PER_NODE   processes per node: one per GPU ("gpu"), or a number                 [gpu]
#   RDZV_ENDPOINT    host:port of the rendezvous store, reachable from every node;
#                    with c10d the first node to arrive hosts it                          [localhost:29500]
#   RDZV_ID          a job id shared by the nodes of one run (unique per job)            [longctx-train]
#   RDZV_BACKEND     torchrun rendezvous backend                                          [c10d]
#   MAX_RESTARTS     times torchrun restarts the workers after a failure; with --resume
#                    they continue from the last checkpoint                               [0]
#   PYTHON           the interpreter with longctx installed                               [python]
#   NCCL_* / GLOO_SOCKET_IFNAME   the usual network settings, passed through
# parallel.sequence_parallel in the config sets the ring size; it should divide
# NPROC_PER_NODE so that a ring stays inside a node (NVLink), while FSDP2 shards
# parameters and optimizer state over all NNODES x NPROC_PER_NODE ranks.
# The checkpoint directory must be on a filesystem every node sees (every rank reads it on --resume).
set -euo pipefail

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RDZV_ID=${RDZV_ID:-longctx-train}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}

if [[ $# -eq 0 || "$*" != *--config* ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    echo "error: pass the longctx train arguments, at least --config FILE" >&2
    exit 2
fi

set -x
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend "$RDZV_BACKEND" \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    -m longctx train --no-progress "$@"
