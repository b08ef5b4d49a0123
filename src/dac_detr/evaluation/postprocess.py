"""Detector outputs -> per-image detections in the original image's pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms

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
        self._check(pred_logits, pred_boxes, orig_sizes)
        top_scores, labels, top_boxes = self.candidates(pred_logits, pred_boxes, orig_sizes)
        results = []
        for b in range(pred_logits.shape[0]):
            if self.method == "nms":
                keep = batched_nms(top_boxes[b], top_scores[b], labels[b], self.nms_iou)[: self.num_select]
            else:
                keep = slice(None)
            results.append({"scores": top_scores[b, keep], "labels": labels[b, keep], "boxes": top_boxes[b, keep]})
        return results

    def _check(self, pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor) -> None:
        if pred_logits.dim() != 3 or pred_boxes.shape[:2] != pred_logits.shape[:2] or pred_boxes.shape[-1] != 4:
            raise ValueError(
                f"PostProcess expects pred_logits (B, Q, C) and pred_boxes (B, Q, 4), got "
                f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}."
            )
        if orig_sizes.shape != (pred_logits.shape[0], 2):
            raise ValueError(f"orig_sizes must be (B, 2) = (h, w) per image, got {tuple(orig_sizes.shape)}.")

    def candidates(self, pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The top (query, class) pairs of every image, batched (no per-image loop, traceable).

        Returns scores (B, k) sorted decreasing, labels (B, k) int64 and boxes (B, k, 4) absolute
        xyxy, with k = min(pre_topk (nms) or num_select (topk), Q*C): for ``topk`` these are the
        final detections, for ``nms`` the input of the suppression.
        """
        num_queries, num_classes = pred_logits.shape[1], pred_logits.shape[2]
        scores = pred_logits.float().sigmoid().flatten(1)  # (B, Q*C), index = query * C + class
        h, w = orig_sizes.to(scores).unbind(1)
        scale = torch.stack((w, h, w, h), dim=1)[:, None, :]  # (B, 1, 4)
        boxes = box_cxcywh_to_xyxy(pred_boxes.float()) * scale  # (B, Q, 4) pixels

        k = min(self.pre_topk if self.method == "nms" else self.num_select, num_queries * num_classes)
        top_scores, top_index = scores.topk(k, dim=1)
        query = torch.div(top_index, num_classes, rounding_mode="floor")
        labels = top_index % num_classes
        top_boxes = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
        return top_scores, labels, top_boxes

    @torch.no_grad()
    def padded(self, pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The detections of ``forward`` as fixed-size tensors, with no per-image Python loop (the
        form an exported graph needs: one graph for every batch size).

        Returns scores (B, K) float32, labels (B, K) int64, boxes (B, K, 4) absolute xyxy, each
        row sorted by decreasing score. ``topk``: K = min(num_select, Q*C), every entry is a
        detection, identical to ``forward``. ``nms``: K = min(num_select, pre_topk, Q*C); rows with
        fewer survivors are padded with score 0, label -1 and box 0. The suppression runs once over
        the whole batch, grouped by (image, class), which is ``forward``'s per-image class-wise NMS; the
        coordinate shifts that keep the groups apart can change a decision only for an IoU within
        float rounding of ``nms_iou`` (as ``batched_nms``'s own coordinate trick can).
        """
        self._check(pred_logits, pred_boxes, orig_sizes)
        top_scores, labels, top_boxes = self.candidates(pred_logits, pred_boxes, orig_sizes)
        if self.method == "topk":
            return top_scores, labels, top_boxes
        batch, k = top_scores.shape
        out_k = min(self.num_select, k)
        image = torch.arange(batch, device=labels.device)[:, None].expand(-1, k).reshape(-1)
        flat_scores, flat_labels, flat_boxes = top_scores.reshape(-1), labels.reshape(-1), top_boxes.reshape(-1, 4)
        # One NMS call for the whole batch, groups kept apart by shifting the boxes: x by class, y by
        # image (batched_nms's coordinate trick on two axes; its per-class loop, which eager
        # batched_nms takes for large inputs, would unroll over the classes present). The shifts
        # are as large as the per-image class shifts of batched_nms, so the rounding is the same.
        span = flat_boxes.max() - flat_boxes.min() + 1
        shift = torch.stack((flat_labels, image, flat_labels, image), 1).to(flat_boxes) * span
        keep = nms(flat_boxes + shift, flat_scores, self.nms_iou)  # sorted by decreasing score
        kept_image = image[keep]
        # rank of each survivor within its image (keep is sorted by decreasing score)
        same_image = kept_image[:, None] == torch.arange(batch, device=labels.device)[None, :]  # (N, B)
        rank = (same_image.long().cumsum(0) - 1).gather(1, kept_image[:, None])[:, 0]
        slot = torch.where(rank < out_k, kept_image * out_k + rank, batch * out_k)  # overflow -> dropped slot
        scores_out = top_scores.new_zeros(batch * out_k + 1).scatter(0, slot, flat_scores[keep])
        labels_out = labels.new_full((batch * out_k + 1,), -1).scatter(0, slot, flat_labels[keep])
        boxes_out = top_boxes.new_zeros(batch * out_k + 1, 4).scatter(0, slot[:, None].expand(-1, 4), flat_boxes[keep])
        return (scores_out[:-1].view(batch, out_k), labels_out[:-1].view(batch, out_k),
                boxes_out[:-1].view(batch, out_k, 4))
