#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py says what it runs; docs/benchmarks.md how):
#     bash scripts/gpu_check.sh --out DIR [gpu_check.py options]
# On a bare GPU machine it first installs what that machine lacks, offline: the wheels carried in
# .whl/ (made by scripts/gpu_prepare.sh wheels) when hydra / omegaconf / pycocotools do not
# import, and this checkout itself when dac_detr does not import, both into $GPU_CHECK_SITE.
# Where everything imports already (a dev machine, CI) it installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}

if ! "$PYTHON" -c "import hydra, omegaconf, pycocotools" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: hydra-core / omegaconf / pycocotools do not import and .whl/ holds no wheels:" \
             "run scripts/gpu_prepare.sh wheels here and carry .whl" >&2
        exit 3
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: installing the wheels of .whl/ failed (see above)" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import dac_detr.kernels, dac_detr.conf" 2>/dev/null; then
    # A plain (not editable) install: the checkout does not change during the run.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
        || { echo "gpu_check: installing this checkout (pip install --target $SITE .) failed" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" scripts/gpu_check.py --python "$PYTHON" "$@"
