"""The reference CUDA op of Deformable-DETR / DAC-DETR (``MultiScaleDeformableAttention``) as a
benchmark column: built on the GPU machine, never vendored or committed here.

The sources are a copy of the official repository's ``models/ops`` kept in a git-ignored folder
(``.gpu_ref/ops``; ``scripts/gpu_prepare.sh`` makes it from a checkout of that repository). This
file builds them with ``torch.utils.cpp_extension.load`` (ninja + nvcc) into a build folder and
loads the result. The 2020 sources use ATen calls that later PyTorch versions deprecate or drop;
the build works on a copy to which the name-for-name replacements in ``COMPATIBILITY`` are
applied (the arithmetic is untouched), and records which ones it made.

    python scripts/msda_reference_op.py --src .gpu_ref/ops --build-dir /tmp/msda_ref

writes ``<build-dir>/build.json`` (status, reason, seconds, replacements) and exits 0 whether or
not the build worked: the benchmark reads that file and says why the column is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

MODULE = "MultiScaleDeformableAttention"
SOURCES = ("src/vision.cpp", "src/cpu/ms_deform_attn_cpu.cpp", "src/cuda/ms_deform_attn_cuda.cu")
# The official setup.py's nvcc flags (half types are not used by the fp32 / fp64 kernels).
NVCC_FLAGS = ["-DWITH_CUDA", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-O3"]  # fmt: skip
# (old, new): deprecated-or-removed ATen spellings in the 2020 sources and their current names.
COMPATIBILITY = (
    (".type().is_cuda()", ".is_cuda()"),
    ("AT_DISPATCH_FLOATING_TYPES(value.type(),", "AT_DISPATCH_FLOATING_TYPES(value.scalar_type(),"),
    (".data<", ".data_ptr<"),
)
BUILD_JSON = "build.json"
# The official wrapper's default chunk of images per kernel launch (any value >= B is one launch).
IM2COL_STEP = 64


class ReferenceUnavailable(RuntimeError):
    """The reference op cannot be used here; the message says why."""


def copy_sources(src: Path, build_dir: Path) -> dict[str, int]:
    """Copy ``src/src`` to ``build_dir/src`` with the COMPATIBILITY replacements; their counts."""
    missing = [s for s in SOURCES if not (src / s).is_file()]
    if missing:
        raise ReferenceUnavailable(
            f"{src} does not hold the official models/ops sources (missing {missing}); "
            "make it with scripts/gpu_prepare.sh ops <checkout of Deformable-DETR or DAC-DETR>"
        )
    target = build_dir / "src"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(src / "src", target)
    counts = {old: 0 for old, _ in COMPATIBILITY}
    for path in sorted(target.rglob("*")):
        if path.suffix not in {".cpp", ".cu", ".cuh", ".h"}:
            continue
        text = path.read_text()
        for old, new in COMPATIBILITY:
            counts[old] += text.count(old)
            text = text.replace(old, new)
        path.write_text(text)
    return counts


def build(src: Path, build_dir: Path) -> dict:
    """Build the extension; the record written to ``build_dir/build.json``."""
    build_dir.mkdir(parents=True, exist_ok=True)
    record = {"module": MODULE, "src": str(src), "build_dir": str(build_dir), "status": "failed"}
    start = time.perf_counter()
    try:
        import torch
        from torch.utils import cpp_extension

        if not torch.cuda.is_available():
            raise ReferenceUnavailable("no CUDA device: the reference op is CUDA only")
        if cpp_extension.CUDA_HOME is None:
            raise ReferenceUnavailable("CUDA_HOME not found (no nvcc): cannot compile the reference op")
        record["replacements"] = copy_sources(src, build_dir)
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # one arch: a short build
        record["arch"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        cpp_extension.load(
            MODULE, [str(build_dir / s) for s in SOURCES], extra_include_paths=[str(build_dir / "src")],
            extra_cflags=["-DWITH_CUDA", "-O3"], extra_cuda_cflags=NVCC_FLAGS,
            build_directory=str(build_dir), verbose=True,
        )  # fmt: skip
        record["status"] = "built"
    except ReferenceUnavailable as error:
        record["status"], record["reason"] = "unavailable", str(error)
    except Exception as error:  # a compiler error: keep its message, the benchmark goes on
        record["reason"] = f"{type(error).__name__}: {error}"[-4000:]
        record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = time.perf_counter() - start
    (build_dir / BUILD_JSON).write_text(json.dumps(record, indent=1))
    return record


def load_built(build_dir: Path):
    """Import the extension built into ``build_dir``; ReferenceUnavailable names why not."""
    record_path = build_dir / BUILD_JSON
    if not record_path.is_file():
        raise ReferenceUnavailable(f"{build_dir} holds no {BUILD_JSON}: the build did not run (or ran out of time)")
    record = json.loads(record_path.read_text())
    if record["status"] != "built":
        raise ReferenceUnavailable(f"the build {record['status']}: {record.get('reason', '?')}")
    sys.path.insert(0, str(build_dir))
    try:
        import importlib

        return importlib.import_module(MODULE)
    except ImportError as error:
        raise ReferenceUnavailable(f"built but does not import: {error}") from error
    finally:
        sys.path.remove(str(build_dir))


def autograd_apply(extension):
    """``apply(value, spatial_shapes, level_start_index, loc, weights)`` with the op's backward."""
    import torch

    class ReferenceMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial_shapes, level_start_index, loc, weights):
            ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, weights)
            return extension.ms_deform_attn_forward(value, spatial_shapes, level_start_index, loc, weights,
                                                    IM2COL_STEP)  # fmt: skip

        @staticmethod
        def backward(ctx, grad_out):
            value, spatial_shapes, level_start_index, loc, weights = ctx.saved_tensors
            grad_value, grad_loc, grad_weights = extension.ms_deform_attn_backward(
                value, spatial_shapes, level_start_index, loc, weights, grad_out.contiguous(), IM2COL_STEP
            )
            return grad_value, None, None, grad_loc, grad_weights

    return ReferenceMSDA.apply


def find_reference_op(build_dir: Path | None = None):
    """``(name, apply, reason)``: the op built into ``build_dir``, else an installed one (mmcv,
    or a ``MultiScaleDeformableAttention`` on the path), else ``(None, None, why not)``."""
    if build_dir is not None:
        try:
            return f"{MODULE} (built from {json.loads((build_dir / BUILD_JSON).read_text())['src']})", \
                autograd_apply(load_built(build_dir)), None  # fmt: skip
        except ReferenceUnavailable as error:
            return None, None, str(error)
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction

        return "mmcv", lambda *a: MultiScaleDeformableAttnFunction.apply(*a, IM2COL_STEP), None
    except Exception:
        pass
    try:
        import MultiScaleDeformableAttention as extension
    except Exception as error:
        return None, None, f"neither mmcv nor {MODULE} imports ({error}); pass --reference-build DIR"
    return f"{MODULE} (installed)", autograd_apply(extension), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(".gpu_ref/ops"), help="copy of the official models/ops")
    parser.add_argument("--build-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    record = build(args.src.resolve(), args.build_dir.resolve())
    print(f"reference op: {record['status']}" + (f" ({record['reason']})" if "reason" in record else "")
          + f" in {record['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
