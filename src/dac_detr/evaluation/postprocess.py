"""Detector outputs -> per-image detections in the original image's pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from ..boxes import box_cxcywh_to_xyxy

METHODS = ("nms", "topk")


class PostProcess(nn.Module):
    """Turn ``pred_logits`` / ``pred_boxes`` into scored, labelled xyxy boxes per image.

    ``nms`` (the official ``NMSPostProcess``, docs/method.md, Evaluation and post-processing):
    sigmoid scores of every (query, class) pair, the top ``min(pre_topk, Q*C)`` of them, class-wise
    NMS at ``nms_iou`` on the boxes in original-image pixels, then the best ``num_select``. (The
    official code takes a fixed top 10000 and crashes when Q*C is smaller.)
    ``topk`` (the DETR-pure ``PostProcess``): the top ``min(num_select, Q*C)`` pairs, no NMS.

    Boxes are scaled to the original image by ``orig_sizes`` and not clipped, as in the official
    code; a query may appear several times with different classes.
    """

    def __init__(self, method: str = "nms", num_select: int = 300, nms_iou: float = 0.8, pre_topk: int = 10000) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"postprocess method must be one of {METHODS}, got {method!r}.")
        if num_select < 1 or pre_topk < 1:
            raise ValueError(f"num_select and pre_topk must be >= 1, got {num_select} and {pre_topk}.")
        self.method = method
        self.num_select = int(num_select)
        self.nms_iou = float(nms_iou)
        self.pre_topk = int(pre_topk)

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            pred_logits: (B, Q, C) class logits (sigmoid, no background class).
            pred_boxes: (B, Q, 4) normalised cxcywh.
            orig_sizes: (B, 2) (h, w) of each original image.
        Returns:
            B dicts ``{scores (K,), labels (K,) int64, boxes (K, 4) absolute xyxy}``, sorted by
            decreasing score, K <= num_select.
        """
        if pred_logits.dim() != 3 or pred_boxes.shape[:2] != pred_logits.shape[:2] or pred_boxes.shape[-1] != 4:
            raise ValueError(
                f"PostProcess expects pred_logits (B, Q, C) and pred_boxes (B, Q, 4), got "
                f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}."
            )
        if orig_sizes.shape != (pred_logits.shape[0], 2):
            raise ValueError(f"orig_sizes must be (B, 2) = (h, w) per image, got {tuple(orig_sizes.shape)}.")
        batch, num_queries, num_classes = pred_logits.shape
        scores = pred_logits.float().sigmoid().flatten(1)  # (B, Q*C), index = query * C + class
        h, w = orig_sizes.to(scores).unbind(1)
        scale = torch.stack((w, h, w, h), dim=1)[:, None, :]  # (B, 1, 4)
        boxes = box_cxcywh_to_xyxy(pred_boxes.float()) * scale  # (B, Q, 4) pixels

        k = min(self.pre_topk if self.method == "nms" else self.num_select, num_queries * num_classes)
        top_scores, top_index = scores.topk(k, dim=1)
        query = torch.div(top_index, num_classes, rounding_mode="floor")
        labels = top_index % num_classes
        top_boxes = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
        results = []
        for b in range(batch):
            if self.method == "nms":
                keep = batched_nms(top_boxes[b], top_scores[b], labels[b], self.nms_iou)[: self.num_select]
            else:
                keep = slice(None)
            results.append({"scores": top_scores[b, keep], "labels": labels[b, keep], "boxes": top_boxes[b, keep]})
        return results
