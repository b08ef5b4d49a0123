#!/usr/bin/env bash
# Prepare, on a machine with pip and a registry, what the GPU check carries to a bare GPU machine
# (nothing there can reach a registry or GitHub). Both folders are git-ignored, never committed:
#
#   scripts/gpu_prepare.sh wheels          # .whl/: the wheels the GPU image lacks, for its Python
#   scripts/gpu_prepare.sh ops CHECKOUT    # .gpu_ref/ops: the official models/ops sources, copied
#                                          # from a git checkout (or bare mirror) of
#                                          # fundamentalvision/Deformable-DETR or DAC-DETR
#   scripts/gpu_prepare.sh check           # sizes: the carried folders and the tree must fit 64 MiB
#
# The wheels are the versions installed here (the ones the tests ran with), for CPython
# $GPU_PYTHON (3.12, the GPU image's python3) on x86-64 manylinux. antlr4-python3-runtime 4.9.3
# (the only series omegaconf 2.3 accepts) is published as source only: it is built into a wheel
# here (pure Python). The reference op sources are a benchmark column only (bench_msda.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU_PYTHON=${GPU_PYTHON:-3.12}
WHEELS="hydra-core omegaconf antlr4-python3-runtime pycocotools setuptools"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

version_here() {
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null \
        || { echo "gpu_prepare: $1 is not installed here; install dac-detr's dependencies first" >&2; exit 2; }
}

wheels() {
    rm -rf .whl && mkdir -p .whl
    for name in $WHEELS; do
        pin="$name==$(version_here "$name")"
        # shellcheck disable=SC2086
        if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
                --implementation cp $PLATFORMS -d .whl "$pin" 2>/dev/null; then
            echo "gpu_prepare: no wheel of $pin for CPython $GPU_PYTHON: building one (pure Python only)"
            "$PYTHON" -m pip wheel -q --no-deps -w .whl "$pin"
        fi
    done
    for f in .whl/*.whl; do
        case "$f" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*manylinux*x86_64*.whl) ;;
            *) echo "gpu_prepare: $f does not run on the GPU machine (CPython $GPU_PYTHON, x86-64)" >&2; exit 2;;
        esac
    done
    ls -l .whl
}

ops() {
    local checkout=${1:?usage: gpu_prepare.sh ops CHECKOUT (a git checkout or mirror of Deformable-DETR / DAC-DETR)}
    local commit
    commit=$(git -C "$checkout" rev-parse HEAD)
    git -C "$checkout" cat-file -e "HEAD:models/ops/src/vision.cpp" \
        || { echo "gpu_prepare: $checkout has no models/ops/src/vision.cpp at HEAD" >&2; exit 2; }
    rm -rf .gpu_ref/ops && mkdir -p .gpu_ref
    # Only the C++/CUDA sources and setup.py (the checked-in build products of one fork stay behind).
    git -C "$checkout" archive --format=tar HEAD models/ops/src models/ops/setup.py | tar -x -C .gpu_ref
    mv .gpu_ref/models/ops .gpu_ref/ops && rm -rf .gpu_ref/models
    git -C "$checkout" show HEAD:LICENSE > .gpu_ref/ops/LICENSE 2>/dev/null || true
    echo "$(git -C "$checkout" config --get remote.origin.url 2>/dev/null || echo "$checkout") $commit" > .gpu_ref/ops/SOURCE
    find .gpu_ref/ops -type f | sort
}

check() {
    git check-ignore -q .whl/x && git check-ignore -q .gpu_ref/x \
        || { echo "gpu_prepare: .whl/ and .gpu_ref/ must be git-ignored" >&2; exit 2; }
    local tree carried
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    carried=$(du -cb .whl .gpu_ref 2>/dev/null | tail -1 | cut -f1)
    echo "working tree $tree bytes + carried (.whl, .gpu_ref) $carried bytes; the limit is $((64 << 20))"
    [ $((tree + carried)) -lt $((64 << 20)) ] || { echo "gpu_prepare: over the 64 MiB carry limit" >&2; exit 2; }
}

case "${1:-}" in
    wheels) wheels ;;
    ops) shift; ops "$@" ;;
    check) check ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
