#!/usr/bin/env bash
# Creates .venv (if missing) and installs reparam.
#
#   bash scripts/setup.sh          the library with its ONNX extra: enough for `reparam export`
#   bash scripts/setup.sh --test   also the test tools and every optional extra (timm, ExecuTorch,
#                                  Core ML, matplotlib), so that no test skips for a missing package
#
# torch and the optional packages are pinned here (torch's CPU build, and releases known to install
# beside it); the package itself asks only for torch>=2.3 and loose ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q)
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"${PIP[@]}" "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
    # Every pin sits beside torch==2.13.0 so that pip never swaps torch for another build.
    "${PIP[@]}" -e ".[onnx,test]" "torch==2.13.0" \
        "timm==1.0.31" "torchvision==0.28.0" \
        "executorch==1.5.1" "coremltools==9.0" \
        "matplotlib==3.11.2" "pytest-xdist==3.8.0"
else
    "${PIP[@]}" -e ".[onnx]" "torch==2.13.0"
fi
