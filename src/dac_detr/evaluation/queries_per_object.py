"""The queries-per-object analysis (docs/method.md, "## Queries per object"): how many queries per object have a high one-to-many score."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from ..losses.assigner import one_to_many_scores


class QueriesPerObject(Metric):
    """Average number of queries per ground-truth object whose score exceeds each threshold.

    The score of query q for object g is ``w_cls * sigmoid(logit[q, c_g]) + w_iou * IoU(box_q,
    box_g)``, the one-to-many assignment score, computed by the assigner's own
    ``dac_detr.losses.assigner.one_to_many_scores`` (docs/method.md, "## One-to-many assignment").
    Feed it the final-layer O-stream predictions (``pred_logits``, ``pred_boxes``) of every validation batch; ``compute()`` returns
    ``{0.6: ..., 0.7: ..., 0.8: ...}``: threshold -> number of (query, object) pairs above it /
    number of objects. The paper's figure reads about 5.5 / 3 / 1.7 at 0.6 / 0.7 / 0.8
    for DAC-DETR after 12 epochs on COCO. Counts are summed over processes under DDP (images
    that the DistributedSampler repeats are counted again; negligible on a full val set).
    """

    full_state_update = False

    def __init__(self, thresholds: Sequence[float] = (0.6, 0.7, 0.8), score_weights: Sequence[float] = (0.3, 0.7)) -> None:
        super().__init__()
        if len(score_weights) != 2:
            raise ValueError(f"score_weights must be (class weight, IoU weight), got {score_weights!r}.")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.score_weights = (float(score_weights[0]), float(score_weights[1]))
        self.add_state("pair_counts", default=torch.zeros(len(self.thresholds), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_objects", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_logits: Tensor, pred_boxes: Tensor, targets: Sequence[dict]) -> None:
        """pred_logits (B, Q, C), pred_boxes (B, Q, 4) normalised cxcywh, targets as the data module gives."""
        thresholds = torch.tensor(self.thresholds, device=pred_logits.device)
        for b, target in enumerate(targets):
            labels = target["labels"].to(pred_logits.device)
            if labels.numel() == 0:
                continue
            score = one_to_many_scores(pred_logits[b].float(), pred_boxes[b].float(), labels,
                                       target["boxes"].to(pred_logits.device), self.score_weights)  # (M, Q)
            self.pair_counts += (score[None] > thresholds[:, None, None]).sum(dim=(1, 2))
            self.num_objects += labels.numel()

    def compute(self) -> dict[float, float]:
        n = max(int(self.num_objects), 1)
        return {t: int(c) / n for t, c in zip(self.thresholds, self.pair_counts)}
