#!/usr/bin/env bash
# Install (or reuse) the environment, then the main job on the embedded default model, with no
# training: extend SmolLM2-135M (8K native) to 16K with NTK-aware rope plus Self-Extend's grouped
# attention, and show a passkey at 16K, twice the native length, where the unscaled model fails and
# the extended one retrieves it (two depths: 25 and 75 %). benchmarks/RESULTS.md has the measured
# run and its time (the first run also converts the default model from GGUF, about 30 s).
# Outputs: out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
longctx() { "$VENV/bin/longctx" "$@"; }
OUT=${OUT:-out/demo}
LENGTH=${LENGTH:-16k}
DEPTHS=${DEPTHS:-25,75}
mkdir -p "$OUT"

echo "== 1. extend: SmolLM2-135M from 8K to 16K tokens, ntk + Self-Extend (config only, weights hard-linked)"
longctx extend --model smollm2-135m --target-len 16k --method ntk --self-extend \
  --output "$OUT/smollm2-135m-16k" --overwrite

echo "== 2. before: the unscaled model, passkey at $LENGTH tokens (native length 8K), depths $DEPTHS %"
longctx needle --model smollm2-135m --task passkey --lengths "$LENGTH" --depths "$DEPTHS" \
  --output "$OUT/needle-unscaled" --overwrite

echo "== 3. after: the extended model, the same prompts"
longctx needle --model "$OUT/smollm2-135m-16k" --task passkey --lengths "$LENGTH" --depths "$DEPTHS" \
  --output "$OUT/needle-extended" --overwrite

echo "== before and after: passkey score per depth at $LENGTH tokens"
"$VENV/bin/python" - "$OUT/needle-unscaled" "$OUT/needle-extended" <<'EOF'
import json, sys
runs = [json.load(open(f"{path}/summary.json")) for path in sys.argv[1:]]
print(f"{'depth %':>8} | {'unscaled':>8} | {'extended':>8}")
for key in runs[0]["per_cell"]:
    length, depth = key.split("@")
    print(f"{depth:>8} | {runs[0]['per_cell'][key]:>8.2f} | {runs[1]['per_cell'][key]:>8.2f}")
print(f"{'mean':>8} | {runs[0]['mean_score']:>8.2f} | {runs[1]['mean_score']:>8.2f}")
EOF
echo "== heatmaps: $OUT/needle-unscaled/heatmap.png and $OUT/needle-extended/heatmap.png"
echo "   extended model: $OUT/smollm2-135m-16k (load it with attn_implementation=\"longctx_self_extend\"; docs/rope.md)"
