#!/usr/bin/env bash
# Check the package on an old torch: build a venv with that torch, install dac-detr[dev] into it
# and run the export, predict, detector and deformable-attention tests.
#
#   scripts/check_torch_floor.sh                 # torch 2.6.0 / torchvision 0.21.0 (the declared floor)
#   scripts/check_torch_floor.sh 2.10.0 0.25.0   # the oldest torch that exports (measured)
#   VENV=/tmp/venv-x scripts/check_torch_floor.sh 2.6.0 0.21.0   # venv path (default /tmp/venv-torch-<torch>)
#
# Not run in CI: it downloads torch with its CUDA libraries from PyPI (~3 GB on disk, about
# 2-3 min on a fast link) and the tests take 2-8 min on 2 CPU cores. Results measured so far:
# docs/deploy.md, "Supported torch versions". On torch < 2.10 the ONNX export tests skip (export needs
# torch >= 2.10) and test_export_on_too_old_torch_is_one_clear_line checks the one-line error.
set -euo pipefail

TORCH=${1:-2.6.0}
TORCHVISION=${2:-0.21.0}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/tmp/venv-torch-$TORCH}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
# torch first (it pins its triton), then the package with the same torch: a floor below what
# pyproject.toml declares fails here with pip's conflict message, which is the point.
"$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$TORCHVISION"
"$VENV/bin/pip" install -q -e "$REPO[dev]" "torch==$TORCH" "torchvision==$TORCHVISION"
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "triton", "onnx", "onnxscript", "onnxruntime")))
EOF

cd "$REPO"
start=$(date +%s)
status=0
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider \
    tests/test_export_onnx.py tests/test_predict.py tests/test_detector.py tests/test_msda_torch.py || status=$?
echo "torch $TORCH: pytest exit $status in $(( $(date +%s) - start )) s"
echo "venv kept at $VENV (reused by the next run; rm -r it when done)"
exit "$status"
