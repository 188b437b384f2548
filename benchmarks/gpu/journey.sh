#!/usr/bin/env bash
# The journey of benchmarks/journey.py on SmolLM2-135M-Instruct, on one GPU (about 8 minutes on
# one H200; sdpa attention, no flash-attn needed):
#   BASE     SmolLM2-135M-Instruct (native 8K)
#   LONG     `longctx extend --method ntk --target-len 16k` of BASE, then a short full fine-tune at
#            16K (configs/smollm2-135m-journey-16k.yaml: 40 steps of 4 x 16K tokens, passkey in prose)
#   SIBLING  BASE fine-tuned at 2K on `reverse` mixed with passkey (native rope)
#   then extract-lora BASE LONG at each rank, merge-adapters onto SIBLING, and `longctx needle`:
#   passkey at 2K and 16K, reverse at 2K and 16K, 5 depths x 4 samples per cell.
#
#   bash benchmarks/gpu/journey.sh [WORK]          # WORK defaults to out/journey-gpu; resumable
#
# Every command runs on the GPU where it can (train, needle pick CUDA themselves; extract-lora and
# merge-adapters are pointed at it). Figures go to benchmarks/RESULTS.md (the journey section).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-out/journey-gpu}
PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-$("$PYTHON" -c 'from longctx.models.reference import resolve_model; print(resolve_model("smollm2-135m"))')}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no GPU: this script is for one"'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
started=$(date +%s)
"$PYTHON" benchmarks/journey.py --work "$WORK" --base "$BASE" --native 2048 --long-len 16384 \
    --long-config configs/smollm2-135m-journey-16k.yaml --long-from-extend ntk \
    --sibling-steps 60 --sibling-lr 5e-5 --sibling-batch 8 \
    --ranks 8,32,128,full --energies 0.9 --seeds 0 --samples 4 --device cuda --threads 4 \
    | tee "$WORK.log"
echo "wall seconds: $(( $(date +%s) - started ))"
