"""One-to-many assignment for the C-Decoder (SPEC part 2, §3; official ``onetomany.py``).

Per decoder layer and per image, without gradients:

1. score S[g, q] = w_cls · p(q, c_g) + w_iou · IoU(box_q, G_g)  (p from the C-Decoder's logits,
   boxes from the configured box source, plain IoU);
2. threshold labelling: query q is positive if max_g S[g, q] >= threshold, for its argmax GT m(q);
3. low-quality matches: each GT's best query is made positive even below the threshold, but it
   keeps its own argmax GT m(q) (detectron2's rule as the official code modifies it: top-1 only);
4. cap: if there are more than ``max_positives`` positives, a uniformly random subset is kept
   (the official budget is 300 x 0.25 = 75, drawn with ``torch.randperm``; here from ``generator``);
5. top-k replacement: a GT g with n_g kept positives (by m(q)) gets instead its
   min(n_g, topk) highest-scoring queries over **all** queries. These may lie outside the positive
   set, and a query may be taken by two GTs. A GT with n_g = 0 gets nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dac_detr.boxes import box_cxcywh_to_xyxy, box_iou


class OneToManyAssigner(nn.Module):
    """DAC-DETR's one-to-many assigner; the defaults are the official values.

    Args:
        score_weights: (w_cls, w_iou) of the score (official 0.3, 0.7).
        threshold: a query is positive when its best score reaches this (official 0.4).
        topk: at most this many queries per GT (official 6).
        low_quality_matches: force each GT's best query positive (official on).
        max_positives: keep at most this many positives per image, a random subset
            (official 75); ``None`` switches the cap off.
    """

    def __init__(
        self,
        score_weights: Sequence[float] = (0.3, 0.7),
        threshold: float = 0.4,
        topk: int = 6,
        low_quality_matches: bool = True,
        max_positives: int | None = 75,
    ) -> None:
        super().__init__()
        score_weights = tuple(float(w) for w in score_weights)
        if len(score_weights) != 2 or min(score_weights) < 0:
            raise ValueError(f"OneToManyAssigner: score_weights must be two non-negative numbers "
                             f"(class weight, IoU weight), e.g. (0.3, 0.7); got {score_weights}")
        if int(topk) < 1:
            raise ValueError(f"OneToManyAssigner: topk must be >= 1 (official 6); got {topk}")
        if max_positives is not None and int(max_positives) < 1:
            raise ValueError(f"OneToManyAssigner: max_positives must be >= 1, or None for no cap "
                             f"(official 75); got {max_positives}")
        self.score_weights = score_weights
        self.threshold = float(threshold)
        self.topk = int(topk)
        self.low_quality_matches = bool(low_quality_matches)
        self.max_positives = None if max_positives is None else int(max_positives)

    def extra_repr(self) -> str:
        return (f"score_weights={self.score_weights}, threshold={self.threshold}, topk={self.topk}, "
                f"low_quality_matches={self.low_quality_matches}, max_positives={self.max_positives}")

    @torch.no_grad()
    def scores(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """S = w_cls · sigmoid(logits)[:, c_g] + w_iou · IoU(boxes, G_g).

        Shapes: logits (Q, C), boxes (Q, 4) cxcywh, gt_labels (M,), gt_boxes (M, 4) cxcywh
        -> (M, Q) scores in [0, w_cls + w_iou].
        """
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits, boxes = logits.float(), boxes.float()
        prob = logits.detach().sigmoid()[:, gt_labels].T  # (M, Q)
        gt_xyxy = box_cxcywh_to_xyxy(gt_boxes.to(boxes.dtype))
        iou = box_iou(gt_xyxy, box_cxcywh_to_xyxy(boxes.detach()))  # (M, Q)
        w_cls, w_iou = self.score_weights
        return w_cls * prob + w_iou * iou

    @torch.no_grad()
    def assign_scores(self, scores: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Steps 2-5 on a given score matrix.

        Args:
            scores: (M, Q) score of every (GT, query) pair, higher is better.
            generator: drives the random subset of the positive cap; on any device (the
                permutation is drawn on the generator's device). ``None``: the global RNG.
        Returns:
            (query_idx, gt_idx), int64 (K,) on ``scores``' device, grouped by GT ascending and
            within a GT by descending score (ties: the lower query index first).
        """
        device = scores.device
        num_gt, num_queries = scores.shape
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if num_gt == 0 or num_queries == 0:
            return empty, empty

        best_gt = scores.argmax(dim=0)  # per query: its argmax GT m(q) (ties: the lower GT index)
        best_score = scores.gather(0, best_gt[None]).squeeze(0)
        positive = best_score >= self.threshold
        if self.low_quality_matches:
            positive[scores.argmax(dim=1)] = True  # each GT's top-1 query (ties: the lower index); it keeps m(q)
        pos_queries = positive.nonzero().squeeze(1)
        if self.max_positives is not None and pos_queries.numel() > self.max_positives:
            perm_device = generator.device if generator is not None else device
            perm = torch.randperm(pos_queries.numel(), generator=generator, device=perm_device)
            pos_queries = pos_queries[perm[: self.max_positives].to(device)]
        per_gt = torch.bincount(best_gt[pos_queries], minlength=num_gt)  # n_g

        k = min(self.topk, num_queries)
        # a stable descending sort (rather than topk) makes the order among equal scores defined
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (M, k)
        keep = torch.arange(k, device=device)[None, :] < per_gt[:, None]  # first min(n_g, k)
        query_idx = order[keep]
        gt_idx = torch.arange(num_gt, device=device)[:, None].expand(num_gt, k)[keep]
        return query_idx, gt_idx

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Assign one image's queries to its GTs.

        Args:
            logits: (Q, C) C-Decoder class logits of the layer.
            boxes: (Q, 4) cxcywh boxes from the configured box source (official: O-Decoder).
            gt_labels: (M,) int64; gt_boxes: (M, 4) cxcywh.
            generator: see :meth:`assign_scores`.
        Returns:
            (query_idx, gt_idx), int64 (K,), see :meth:`assign_scores`.
        """
        if gt_labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        return self.assign_scores(self.scores(logits, boxes, gt_labels, gt_boxes), generator)
