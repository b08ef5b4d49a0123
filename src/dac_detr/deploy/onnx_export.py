"""ONNX export of a detector: one file for every batch size and image size.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), chosen over
the TorchScript-based exporter because it (a) keeps the batch, height and width symbolic through
the whole graph from one trace (the TorchScript tracer records every Python int it meets, e.g. the
per-level feature sizes, as constants), (b) translates ``torchvision.ops.nms`` (ONNX
``NonMaxSuppression``) for the post-processing inside the graph, and (c) is the exporter PyTorch
maintains (the TorchScript one is deprecated). It needs ``onnxscript`` and torch >= 2.10
(``TORCH_FOR_EXPORT``; docs/deploy.md, Supported torch versions).

What keeps the sizes symbolic (checked by tests/test_export_onnx.py at several sizes):

* the model code never calls ``int()`` on a size and builds coordinate grids with ``arange``
  (``linspace(steps=h)`` would pin ``h``);
* the deformable attention takes the pure-PyTorch path (``F.grid_sample`` per level, ONNX
  ``GridSample``, opset >= 16) while exporting: the custom ``dac_detr::ms_deform_attn`` op has
  no ONNX translation;
* the example batch is 2 and the example image 160 x 192 or larger, with H != W and every
  feature level at least 2 x 2 (``torch.export`` specialises sizes 0 and 1 and gives equal sizes
  one symbol); the export runs with ``backed_size_oblivious`` so that no guard excludes size-1
  levels (a 64 px image has a 1 x 1 stride-64 level).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..utils.config_checks import ConfigError
from .graph import InferenceGraph, fold_frozen_batchnorm

log = logging.getLogger("dac_detr")

OPSET = 18  # GridSample needs >= 16; 18 is the newest the torchlib translations target by default
METADATA_PREFIX = "dac_detr."
MIN_SIDE = 32  # smallest image side the dynamic dims admit (one stride-32 cell)
MAX_SIDE = 8192
EXAMPLE_BATCH = 2
TORCH_FOR_EXPORT = "2.10"  # 2.5.1-2.9.1 measured to fail; 2.10.0 and 2.14.1 pass; 2.11-2.13 untested


class ExportUnavailable(ConfigError):
    """The installed packages cannot export (missing onnx/onnxscript, or a too old torch)."""


def _export_parameters() -> set[str]:
    import inspect

    return set(inspect.signature(torch.onnx.export).parameters)


def require_onnx_export() -> None:
    """Fail with the one-line fix when the export dependencies are missing."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportUnavailable(
            f"format=onnx needs {' and '.join(missing)}: pip install \"dac-detr[export]\" (onnx, onnxruntime, onnxscript)."
        )
    # Measured (docs/deploy.md, Supported torch versions): torch 2.5.1 and 2.6.0 lack
    # torch.compiler.is_exporting(), by which the model picks its ONNX-translatable deformable
    # attention ("No ONNX function found" for the custom op), and 2.6's torch.export pins the image
    # size on torch.tensor() of the level sizes; 2.7.1, 2.8.0 and 2.9.1 have the function but their
    # torch.export still guards on the image size (conv/pool output parity, no size-1 levels; 2.9.1
    # also H, W >= 65 and batch != 1) and refuses dynamic sizes.
    # A version check is unavoidable: 2.7-2.9 fail deep inside torch.export, after minutes of tracing.
    # torch.__version__ is a TorchVersion: it compares as a version ("2.9.1" < "2.10"), not as text
    if "dynamo" not in _export_parameters() or torch.__version__ < TORCH_FOR_EXPORT:
        raise ExportUnavailable(
            f"format=onnx needs torch >= {TORCH_FOR_EXPORT} (this is torch {torch.__version__}; older torch.export "
            f"cannot keep the image size dynamic): pip install -U torch torchvision."
        )


def example_size(num_queries: int, min_height: int = 160, min_width: int = 192) -> tuple[int, int]:
    """An example (H, W) for the trace: H != W, >= 160 x 192, every level >= 2 x 2 and enough encoder
    tokens (sum over strides 8, 16, 32, 64 of ceil(H/s)·ceil(W/s)) for ``num_queries`` two-stage
    proposals."""
    h, w = min_height, min_width
    while sum(-(-h // s) * -(-w // s) for s in (8, 16, 32, 64)) < num_queries:
        h, w = h + 64, w + 64
    return h, w


def _backed_size_oblivious():
    """Reason about backed sizes as if they could be 0/1 (no guard that excludes 1 x 1 levels)."""
    config = getattr(torch.fx.experimental, "_config", None)
    if config is not None and hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def export_onnx(
    graph: InferenceGraph,
    out: str | Path,
    *,
    metadata: dict[str, Any],
    example: Optional[tuple[int, int]] = None,
    opset: int = OPSET,
    optimize: bool = False,
) -> Path:
    """Export ``graph`` (eval mode, CPU) to ``out`` with dynamic batch, height and width.

    ``metadata`` goes into the model's ``metadata_props`` under ``dac_detr.<key>`` (values JSON
    encoded). The file is checked with ``onnx.checker`` (full check, shapes included). Returns
    ``out``. ``optimize`` runs onnxscript's graph optimiser (constant folding, fusions): smaller
    graph, several times slower export.
    """
    require_onnx_export()
    # a copy: the caller's model keeps its modules; FrozenBatchNorm2d folded (bit-identical, shorter export)
    graph = fold_frozen_batchnorm(copy.deepcopy(graph).eval().cpu())
    args, dynamic = _example_inputs(graph, example)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(
        dynamo=True, dynamic_shapes=tuple(dynamic), input_names=graph.input_names,
        output_names=graph.output_names, opset_version=opset,
    )
    if "optimize" in _export_parameters():  # torch >= 2.6
        kwargs["optimize"] = optimize
    start = time.perf_counter()
    with torch.no_grad(), _backed_size_oblivious(), warnings.catch_warnings():
        # torch.onnx names the axes after the Dims; it warns once per input that shares them.
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used.*")
        program = torch.onnx.export(graph, args, **kwargs)
    if program is None:
        raise ExportUnavailable(f"torch.onnx.export(dynamo=True) returned no program; use torch >= {TORCH_FOR_EXPORT}.")
    dynamic_axes = {name: sorted(spec) for name, spec in zip(graph.input_names, dynamic)}
    _save_checked(program, out, metadata, dynamic_axes)
    log.info("ONNX export: %s (opset %d, %.0f s)", out, opset, time.perf_counter() - start)
    return out


def _example_inputs(graph: InferenceGraph, example: Optional[tuple[int, int]]) -> tuple[tuple, list[dict]]:
    """The traced inputs (a batch of 2, the second image padded) and their dynamic axes.

    images (B, 3, H, W), pixel_mask (B, H, W) and, with post-processing in the graph, orig_sizes
    (B, 2); B, H and W are ``torch.export.Dim``s shared by the inputs that carry them.
    """
    num_queries = int(getattr(graph.detector, "num_queries", 1))
    h, w = example or example_size(num_queries)
    images = torch.zeros(EXAMPLE_BATCH, 3, h, w)
    pixel_mask = torch.zeros(EXAMPLE_BATCH, h, w, dtype=torch.bool)
    pixel_mask[1, h - 32:, :] = True  # a padded second image: both mask branches are exercised
    args: tuple = (images, pixel_mask)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    dynamic: list[dict] = [{0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}]
    if graph.postprocess is not None:
        args = args + (torch.tensor([[h, w], [h - 32, w]], dtype=torch.int64),)
        dynamic.append({0: batch})
    return args, dynamic


def _save_checked(program: Any, out: Path, metadata: dict[str, Any], dynamic_axes: dict[str, list[int]]) -> None:
    """Write the exported program to ``out`` with our metadata, after the dynamic-axes check and
    ``onnx.checker``; nothing is left at ``out`` (or beside it) when a check fails."""
    import onnx

    tmp = out.with_name(out.name + ".tmp")
    try:
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key = METADATA_PREFIX + key
            entry.value = value if isinstance(value, str) else json.dumps(value)
        model.producer_name = "dac_detr"
        _check_dynamic_inputs(model, dynamic_axes)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _check_dynamic_inputs(model: Any, dynamic_axes: dict[str, list[int]]) -> None:
    """Fail when an axis meant to be dynamic came out fixed in the file.

    torch.export raises when a dynamic size gets specialised, but torch.onnx.export may retry with
    the suggested fix (a fixed size) and write a graph that accepts only the example's size.
    """
    fixed = []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis in dynamic_axes.get(value.name, []):
            if axis < len(dims) and not dims[axis].dim_param:
                fixed.append(f"{value.name}[{axis}]={dims[axis].dim_value}")
    if fixed:
        raise ExportUnavailable(
            f"the ONNX export fixed sizes that must stay dynamic ({', '.join(fixed)}) with torch {torch.__version__}; "
            f"use torch >= {TORCH_FOR_EXPORT} (docs/deploy.md, Supported torch versions)."
        )


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The ``dac_detr.*`` metadata of an exported file, JSON-decoded (keys without the prefix)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return _decode(model.metadata_props)


def _decode(props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in props:
        key, value = (entry.key, entry.value) if hasattr(entry, "key") else entry
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX):]] = value
    return out


def graph_metadata(class_names: Sequence[str], category_ids: Sequence[int], config: dict[str, Any],
                   postprocess: Optional[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The metadata every export carries: classes, label -> category id, the inference config, the
    post-processing in the graph (or null) and the input/output contract."""
    outputs = (["scores", "labels", "boxes"] if postprocess else []) + ["pred_logits", "pred_boxes"]
    inputs = ["images", "pixel_mask"] + (["orig_sizes"] if postprocess else [])
    return {
        "class_names": list(class_names),
        "label_to_category_id": {str(i): int(c) for i, c in enumerate(category_ids)},
        "config": config,
        "postprocess": postprocess,
        "inputs": inputs,
        "outputs": outputs,
        "pixel_mask": "True on padding",
        "boxes": "absolute xyxy in the original image (label -1: padding)" if postprocess else None,
        "pred_boxes": "normalised cxcywh",
        **extra,
    }
