#!/usr/bin/env bash
# Issue 17's table on one GPU (about 8 minutes on an H200): every training-free method's passkey
# score at 16K, 32K and 64K on the default model, 5 depths x 10 keys, float32.
#   bash benchmarks/gpu/training_free.sh            # OUT, MODEL, LENGTHS, SAMPLES, METHODS, DEVICE override
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-out/gpu-training-free}
mkdir -p "$(dirname "$OUT")"
"$PY" benchmarks/training_free.py run --model "${MODEL:-smollm2-135m}" --lengths "${LENGTHS:-16k,32k,64k}" \
  ${METHODS:+--methods "$METHODS"} --samples "${SAMPLES:-10}" --device "${DEVICE:-cuda}" \
  --work "$OUT" > "$OUT.log"
"$PY" benchmarks/training_free.py table --work "$OUT" | tee "$OUT.md"
