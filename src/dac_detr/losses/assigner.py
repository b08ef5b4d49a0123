"""One-to-many assignment for the C-Decoder (docs/method.md, "## One-to-many assignment"; official ``onetomany.py``).

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

from dac_detr.boxes import box_cxcywh_to_xyxy, elementwise_box_iou
from dac_detr.losses.pairs import LayerPairs


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
        """S = w_cls · sigmoid(logits)[:, c_g] + w_iou · IoU(boxes, G_g), see :func:`one_to_many_scores`.

        Shapes: logits (..., Q, C), boxes (..., Q, 4) cxcywh, gt_labels (..., M), gt_boxes (..., M, 4)
        cxcywh -> (..., M, Q) scores in [0, w_cls + w_iou].
        """
        return one_to_many_scores(logits, boxes, gt_labels, gt_boxes, self.score_weights)

    @torch.no_grad()
    def assign_scores(self, scores: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Steps 2-5 on one image's score matrix.

        Args:
            scores: (M, Q) score of every (GT, query) pair, higher is better.
            generator: drives the random subset of the positive cap; on any device (the
                permutation is drawn on the generator's device). ``None``: the global RNG.
        Returns:
            (query_idx, gt_idx), int64 (K,) on ``scores``' device, grouped by GT ascending and
            within a GT by descending score (ties: the lower query index first).
        """
        pairs = self.assign_layers(scores[None, None], (scores.shape[0],), generator)
        return pairs.query_idx, pairs.gt_idx

    @torch.no_grad()
    def assign_layers(self, scores: Tensor, sizes: Sequence[int], generator: torch.Generator | None = None
                      ) -> LayerPairs:
        """Steps 2-5 for L stacked layers and B images at once.

        Args:
            scores: (L, B, M, Q) scores, GTs padded to M = max(sizes) (padded rows are ignored).
            sizes: the B images' GT counts.
            generator: see :meth:`assign_scores`. The positive cap draws one permutation for
                every (layer, image) over the cap, in layer-major then image order, exactly the
                draws of assigning each layer and image on its own.
        Returns:
            :class:`LayerPairs` ordered by layer, image, GT ascending, then descending score
            (ties: the lower query index first).
        """
        device = scores.device
        num_layers, batch, max_gt, num_queries = scores.shape
        valid = torch.arange(max_gt, device=device)[None, :] < torch.tensor(list(sizes), device=device)[:, None]
        if max_gt == 0 or num_queries == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return LayerPairs(empty, empty, empty, empty, num_layers)
        valid = valid[None].expand(num_layers, batch, max_gt)
        # padded GTs score -inf, so no query takes one as its argmax GT (real scores are >= 0)
        masked = scores.masked_fill(~valid[..., None], float("-inf"))
        best_gt = masked.argmax(dim=2)  # (L, B, Q) per query: m(q) (ties: the lower GT index)
        best_score = masked.gather(2, best_gt[:, :, None]).squeeze(2)
        has_gt = torch.tensor([n > 0 for n in sizes], device=device)[None, :, None]
        positive = (best_score >= self.threshold) & has_gt
        if self.low_quality_matches:
            # each GT's top-1 query (ties: the lower index) is positive; it keeps its own m(q)
            top_query = scores.argmax(dim=3)  # (L, B, M)
            forced = torch.zeros_like(best_gt).scatter_add_(2, top_query, valid.long())
            positive |= forced > 0
        if self.max_positives is not None and num_queries > self.max_positives:
            positive = self._cap(positive, generator)
        per_gt = torch.zeros_like(valid, dtype=torch.int64).scatter_add_(2, best_gt, positive.long())  # n_g

        k = min(self.topk, num_queries)
        # a stable descending sort (rather than topk) makes the order among equal scores defined
        order = torch.sort(scores, dim=3, descending=True, stable=True).indices[..., :k]  # (L, B, M, k)
        keep = torch.arange(k, device=device) < per_gt[..., None]  # first min(n_g, k); padded GTs: n_g = 0
        layer_idx, batch_idx, gt_idx, _ = keep.nonzero(as_tuple=True)
        return LayerPairs(layer_idx, batch_idx, order[keep], gt_idx, num_layers)

    def _cap(self, positive: Tensor, generator: torch.Generator | None) -> Tensor:
        """Keep a uniformly random subset of ``max_positives`` positives where there are more.

        positive (L, B, Q) bool. One host sync for the counts (the permutation's length must be
        known), then, per (layer, image) over the cap in layer-major order, the official
        ``randperm`` over its positives in ascending query order.
        """
        device = positive.device
        counts = positive.sum(dim=2).flatten().tolist()
        over = [i for i, n in enumerate(counts) if n > self.max_positives]
        if not over:
            return positive
        flat = positive.flatten(0, 1).clone()
        perm_device = generator.device if generator is not None else device
        for i in over:
            queries = flat[i].nonzero().squeeze(1)
            perm = torch.randperm(queries.numel(), generator=generator, device=perm_device)
            flat[i] = False
            flat[i, queries[perm[: self.max_positives].to(device)]] = True
        return flat.view_as(positive)

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


def one_to_many_scores(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                       score_weights: Sequence[float]) -> Tensor:
    """The one-to-many score S = w_cls · p(q, c_g) + w_iou · IoU(box_q, G_g), detached.

    The one definition of the score, used by the assigner and by the queries-per-object
    analysis (``dac_detr.evaluation.QueriesPerObject``). Half-precision inputs are scored in
    float32.

    Args:
        logits: (..., Q, C) class logits; boxes: (..., Q, 4) cxcywh.
        gt_labels: (..., M) int64; gt_boxes: (..., M, 4) cxcywh; the leading dims are broadcast.
        score_weights: (w_cls, w_iou).
    Returns:
        (..., M, Q) scores.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits, boxes = logits.float(), boxes.float()
    prob = logits.detach().sigmoid()
    index = gt_labels[..., None, :].expand(*prob.shape[:-1], gt_labels.shape[-1])
    prob = torch.gather(prob, -1, index).transpose(-1, -2)  # (..., M, Q): p of each GT's class
    gt_xyxy = box_cxcywh_to_xyxy(gt_boxes.to(boxes.dtype))
    iou = elementwise_box_iou(gt_xyxy[..., :, None, :], box_cxcywh_to_xyxy(boxes.detach())[..., None, :, :])
    w_cls, w_iou = score_weights
    return w_cls * prob + w_iou * iou
