#!/usr/bin/env bash
# Creates .venv (if missing) and installs reparam with its ONNX and test extras.
# torch is pinned here (the CPU build); the package itself asks only for torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[onnx,test]"
