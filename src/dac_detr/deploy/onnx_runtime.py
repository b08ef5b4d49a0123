"""An exported file under onnxruntime, called like the PyTorch graph it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..utils.checkpoint import CheckpointError
from .onnx_export import _decode


class OnnxDetector:
    """``OnnxDetector(path)(images, pixel_mask[, orig_sizes]) -> dict of torch tensors``.

    The keys are the file's outputs (``pred_logits``/``pred_boxes``, or ``scores``/``labels``/
    ``boxes`` when the post-processing is in the graph). Providers: CUDA when onnxruntime has it
    (``onnxruntime-gpu``) and ``device`` is not ``cpu``, else CPU. ``threads`` sets the intra-op
    threads (0: onnxruntime's default). ``metadata`` holds the ``dac_detr.*`` metadata.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CheckpointError(
                f"model={path} is an ONNX file: running it needs onnxruntime (pip install \"dac-detr[export]\")."
            ) from None
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist. Pass model=/path/to/model.onnx written by dac_detr.export format=onnx.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CheckpointError(f"onnxruntime cannot load {path} ({type(err).__name__}: {err}); re-export it with "
                                  "python -m dac_detr.export format=onnx.") from None
        self.path = path
        self.providers = self.session.get_providers()
        self.metadata = _decode(self.session.get_modelmeta().custom_metadata_map.items())
        if "class_names" not in self.metadata:
            raise CheckpointError(f"{path} has no dac_detr metadata; pass an ONNX file written by dac_detr.export.")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def postprocess(self) -> Optional[dict[str, Any]]:
        """The post-processing config inside the graph, or None (raw outputs)."""
        return self.metadata.get("postprocess")

    def __call__(self, images: Tensor, pixel_mask: Tensor, orig_sizes: Optional[Tensor] = None) -> dict[str, Tensor]:
        feeds = {"images": images.detach().float().cpu().numpy(), "pixel_mask": pixel_mask.cpu().numpy().astype(np.bool_)}
        if "orig_sizes" in self.input_names:
            if orig_sizes is None:
                raise ValueError(f"{self.path} post-processes in the graph: pass orig_sizes (B, 2) = (h, w).")
            feeds["orig_sizes"] = orig_sizes.cpu().numpy().astype(np.int64)
        outputs = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in zip(self.output_names, outputs)}
