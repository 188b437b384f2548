#!/usr/bin/env bash
# Issue 16's GPU check (about 8 minutes on one H200; torch, transformers and peft only, sdpa, no
# flash-attn): the default model extended to 64K (`longctx extend --method ntk`), a passkey grid at
# 16K, 32K and 64K (5 depths x 2 samples), answered by our harness (`longctx needle`: chunked
# prefill, prefix reuse, drafts) and by a plain `model.generate` per cell
# (benchmarks/needle_generate.py), scores and seconds side by side in $WORK.md.
#   bash benchmarks/gpu/needle.sh       # WORK, MODEL, METHOD, TARGET, LENGTHS, DEPTHS, SAMPLES, DEVICE, PY override
# Resumable: a finished step is skipped, an interrupted grid resumes. Any failing step stops the
# script with its error (set -e), and the table refuses to print unless both sides have every cell.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
WORK=${WORK:-out/gpu-needle}
DEVICE=${DEVICE:-cuda}
LENGTHS=${LENGTHS:-16k,32k,64k}
DEPTHS=${DEPTHS:-0,25,50,75,100}
SAMPLES=${SAMPLES:-2}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $DEVICE == cuda* ]]; then
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no GPU: run with DEVICE=cpu and tiny sizes to test the parts"'
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
mkdir -p "$WORK"
started=$(date +%s)
if [[ ! -f $WORK/model/config.json ]]; then
  "$PY" -m longctx extend --model "${MODEL:-smollm2-135m}" --method "${METHOD:-ntk}" --target-len "${TARGET:-64k}" \
    --output "$WORK/model"
fi
resume=()
[[ -f $WORK/harness/settings.json ]] && resume=(--resume)
"$PY" -m longctx needle --model "$WORK/model" --lengths "$LENGTHS" --depths "$DEPTHS" --samples "$SAMPLES" \
  --device "$DEVICE" --output "$WORK/harness" "${resume[@]}" 2> "$WORK/harness.log"
echo "longctx needle: $(( $(date +%s) - started )) s since start"
"$PY" benchmarks/needle_generate.py run --model "$WORK/model" --lengths "$LENGTHS" --depths "$DEPTHS" \
  --samples "$SAMPLES" --device "$DEVICE" --output "$WORK/generate.jsonl" > "$WORK/generate.log"
"$PY" benchmarks/needle_generate.py table --harness "$WORK/harness" --generate "$WORK/generate.jsonl" | tee "$WORK.md"
echo "wall seconds: $(( $(date +%s) - started ))" | tee -a "$WORK.md"
