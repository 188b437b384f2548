#!/usr/bin/env bash
# Install (or reuse) the environment, then the main job on the embedded default model:
# plan and apply a 4x context extension of SmolLM2-135M (8K -> 32K) and check the result
# with a short passkey run. About 5 minutes on a 2-core CPU. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
longctx() { "$VENV/bin/longctx" "$@"; }
OUT=${OUT:-out/demo}
mkdir -p "$OUT"

echo "== 1. the plan: SmolLM2-135M from 8K to 32K tokens with YaRN"
longctx plan --model smollm2-135m --target-len 32k --method yarn

echo "== 2. extend: write the 32K model (config only, weights hard-linked)"
longctx extend --model smollm2-135m --target-len 32k --method yarn --output "$OUT/smollm2-135m-32k" --overwrite

echo "== 3. check: passkey retrieval at 2K-8K, needle at 3 depths"
longctx needle --model "$OUT/smollm2-135m-32k" --task passkey --lengths 2k,4k,8k --depths 0,50,100 \
  --output "$OUT/needle" --overwrite

echo "== done: extended model in $OUT/smollm2-135m-32k, heatmap in $OUT/needle/heatmap.png"
