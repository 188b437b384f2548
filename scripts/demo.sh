#!/usr/bin/env bash
# Install (or reuse) the environment, then the main job on the embedded default model:
# plan and apply a 4x context extension of SmolLM2-135M (8K -> 32K) and check the result
# with a short passkey run. A few minutes on a 2-core CPU (the first run also converts the
# default model from GGUF, about 30 s). Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
longctx() { "$VENV/bin/longctx" "$@"; }
OUT=${OUT:-out/demo}
mkdir -p "$OUT"

echo "== 1. the plan: SmolLM2-135M from 8K to 32K tokens (NTK-aware, the default method)"
longctx plan --model smollm2-135m --target-len 32k

echo "== 2. extend: write the 32K model (config only, weights hard-linked)"
longctx extend --model smollm2-135m --target-len 32k --output "$OUT/smollm2-135m-32k" --overwrite

echo "== 3. check: passkey retrieval at 2K and 4K tokens, needle at 3 depths"
longctx needle --model "$OUT/smollm2-135m-32k" --task passkey --lengths 2k,4k --depths 0,50,100 \
  --output "$OUT/needle" --overwrite

echo "== done: extended model in $OUT/smollm2-135m-32k, heatmap in $OUT/needle/heatmap.png"
