#!/usr/bin/env bash
# SmolLM2-135M full fine-tune steps at 16K, 32K and 64K on one GPU (bfloat16 autocast, activation
# checkpointing, chunked loss, ntk rope for each length): tokens/s, MFU and peak memory against
# `longctx train --dry-run`'s prediction; then the ring's CUDA tile kernels against the math kernel.
# About 3-5 minutes on one H200 with torch, transformers and peft (no flash-attn needed).
#
#   bash benchmarks/gpu/train.sh [LOG]       # LOG defaults to out/train-gpu.log
#
# Figures go to benchmarks/RESULTS.md (the `longctx train` section). PEAK_TFLOPS: the GPU's dense
# bfloat16 TFLOPS (989 for an H100 or H200 SXM).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOG=${1:-out/train-gpu.log}
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$(dirname "$LOG")"
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu MODEL=DIR LENGTHS=256 RING_LENGTHS=256: its parts on a CPU (tests/test_gpu_train.py)
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no GPU: this script is for one"'
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
started=$(date +%s)
"$PYTHON" benchmarks/train_gpu.py --device "$DEVICE" --model "${MODEL:-smollm2-135m}" --lengths "${LENGTHS:-16k,32k,64k}" \
    --ring-lengths "${RING_LENGTHS:-16k,32k,64k}" --steps "${STEPS:-3}" --peak-tflops "${PEAK_TFLOPS:-989}" | tee "$LOG"
echo "wall seconds: $(( $(date +%s) - started ))"
