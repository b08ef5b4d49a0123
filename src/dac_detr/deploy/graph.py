"""The module that is exported: the detector's inference path, optionally with post-processing."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..evaluation.postprocess import PostProcess

RAW_OUTPUTS = ("pred_logits", "pred_boxes")
DETECTION_OUTPUTS = ("scores", "labels", "boxes")


class InferenceGraph(nn.Module):
    """``detector`` (eval mode: O-Decoder only) with the post-processing optionally inside.

    Without ``postprocess``: ``forward(images, pixel_mask) -> (pred_logits (B, Q, C),
    pred_boxes (B, Q, 4) normalised cxcywh)``.

    With ``postprocess`` (a ``PostProcess``): ``forward(images, pixel_mask, orig_sizes) ->
    (scores (B, K) float32, labels (B, K) int64 category ids of the training set, boxes (B, K, 4)
    absolute xyxy in the original image, pred_logits, pred_boxes)``: ``PostProcess.padded``'s
    detections with each class index replaced by ``category_ids[index]`` (padding entries, ``nms``
    only, have label -1), then the raw outputs as well (computed anyway; free to return).

    images (B, 3, H, W) float, ImageNet-normalised, zero-padded bottom-right; pixel_mask (B, H, W)
    bool, True on padding; orig_sizes (B, 2) int64 (h, w) of each original image.
    """

    def __init__(self, detector: nn.Module, postprocess: Optional[PostProcess] = None,
                 category_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.detector = detector
        self.postprocess = postprocess
        if postprocess is not None:
            if category_ids is None:
                raise ValueError("InferenceGraph with post-processing needs category_ids (class index -> category id).")
            self.register_buffer("category_ids", torch.tensor([int(c) for c in category_ids], dtype=torch.int64),
                                 persistent=False)

    @property
    def input_names(self) -> list[str]:
        return ["images", "pixel_mask"] + (["orig_sizes"] if self.postprocess is not None else [])

    @property
    def output_names(self) -> list[str]:
        return list(DETECTION_OUTPUTS + RAW_OUTPUTS if self.postprocess is not None else RAW_OUTPUTS)

    def forward(self, images: Tensor, pixel_mask: Tensor, orig_sizes: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        out = self.detector(images, pixel_mask)
        if self.postprocess is None:
            return out["pred_logits"], out["pred_boxes"]
        if orig_sizes is None:
            raise ValueError("this graph post-processes: pass orig_sizes (B, 2) = (h, w) of the original images.")
        scores, labels, boxes = self.postprocess.padded(out["pred_logits"], out["pred_boxes"], orig_sizes)
        category = self.category_ids[labels.clamp(min=0)]
        labels = torch.where(labels >= 0, category, torch.full_like(category, -1))
        return scores, labels, boxes, out["pred_logits"], out["pred_boxes"]


class _ScaleShift(nn.Module):
    """``x * scale + shift`` with the per-channel (1, C, 1, 1) factors of a FrozenBatchNorm2d."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every torchvision FrozenBatchNorm2d replaced by its precomputed scale/shift, in place.

    FrozenBatchNorm2d computes ``scale = w * rsqrt(var + eps)`` and ``shift = b - mean * scale``
    from its buffers on every call and returns ``x * scale + shift``; the same two tensors computed
    once by the same operations give bit-identical outputs and take ~8 nodes per norm out of the
    exported graph (53 norms in R50), which shortens the export.
    """
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, FrozenBatchNorm2d):
            w = child.weight.reshape(1, -1, 1, 1)
            b = child.bias.reshape(1, -1, 1, 1)
            rv = child.running_var.reshape(1, -1, 1, 1)
            rm = child.running_mean.reshape(1, -1, 1, 1)
            scale = w * (rv + child.eps).rsqrt()
            setattr(module, name, _ScaleShift(scale, b - rm * scale))
        else:
            fold_frozen_batchnorm(child)
    return module
