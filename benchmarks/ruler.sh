#!/bin/bash
# RULER's suite on a model, grown one sample per task and length per round, so that an interrupted
# or time-boxed measurement still leaves every cell with the same number of samples.
#   benchmarks/ruler.sh OUTPUT LENGTHS ROUNDS [extra flags for longctx needle --suite ruler]
#   benchmarks/ruler.sh /work/runs/ruler/smollm2-4k8k 4k,8k 20
# Touch OUTPUT.stop to end after the round in progress. The table is printed after every round.
# LOCK=FILE runs each round under flock FILE (to share a machine with timed jobs).
set -euo pipefail
output=$1 lengths=$2 rounds=$3
shift 3
python=${PYTHON:-.venv/bin/python}
for n in $(seq 1 "$rounds"); do
  [ -e "$output.stop" ] && break
  resume=(); [ -d "$output" ] && resume=(--resume)
  ${LOCK:+flock "$LOCK"} "$python" -m longctx needle --suite ruler --lengths "$lengths" --samples "$n" \
      --output "$output" "${resume[@]}" "$@"
  echo "round $n done $(date -u +%FT%TZ)"
done
