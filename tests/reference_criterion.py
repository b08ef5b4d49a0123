"""A frozen copy of the per-layer criterion as it was before the batched one (commit 2cb0fb8).

The equality tests (tests/test_criterion_batched.py) and scripts/bench_criterion.py compare the
batched ``dac_detr.losses.SetCriterion`` with this one: every loss term, every statistic and
every gradient. It computes each decoder layer, stream and image on its own (a Hungarian cost
matrix, a one-to-many assignment and three loss terms per layer), which is the straightforward
reading of the method; it is not used by the package. Do not edit it to follow changes of the
package: it is the reference the package must keep agreeing with.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

# Pure helpers the batched code still uses unchanged (tested against their formulas in
# tests/test_losses.py) come from the package; what the batching rewrote stays frozen below.
from dac_detr.losses.functional import (
    _at_least_float32,
    iou_aware_quality,
    paired_box_iou,
    rank_weights,
    rank_within_groups,
)
from dac_detr.boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
)


# ---- frozen from src/dac_detr/losses/functional.py ----
DUPLICATE_TARGETS = ("last", "max")


def _distinct_positives(logits: Tensor, pos_index: tuple[Tensor, ...], pos_target: Tensor,
                        duplicate_target: str = "last") -> tuple[Tensor, Tensor, Tensor]:
    """The positive entries as flat indices into ``logits``, one target per entry:
    (K,) x 3 -> flat (K,), target (K,), keep (K,) bool (one True per entry).

    An entry named by several positives takes, with ``duplicate_target``:
        ``"last"`` (default, the official behaviour): the target of the **last** of them in the
            given order (the official ``pos_weights[pos_idx_c] = t`` on CPU);
        ``"max"``: the largest of their targets.
    The positives are sorted stably by entry (for ``"max"``, after a stable sort by target), so
    the last of each entry's run is the one kept; this does not rely on how an indexed
    assignment resolves duplicate indices, and gives the same result on every device.
    (No ``torch.unique``: it would wait for the GPU on every call.)
    """
    if duplicate_target not in DUPLICATE_TARGETS:
        raise ValueError(f"duplicate_target must be one of {DUPLICATE_TARGETS} (official \"last\"); "
                         f"got {duplicate_target!r}")
    batch_idx, query_idx, class_idx = pos_index
    num_queries, num_classes = logits.shape[1], logits.shape[2]
    flat = (batch_idx * num_queries + query_idx) * num_classes + class_idx
    if duplicate_target == "max":
        by_target = torch.sort(pos_target, stable=True).indices
        order = by_target[torch.sort(flat[by_target], stable=True).indices]
    else:
        order = torch.sort(flat, stable=True).indices
    flat, target = flat[order], pos_target[order].to(logits.dtype)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[:-1] = flat[1:] != flat[:-1]
    return flat, target, keep


def ia_bce_loss(
    logits: Tensor, pos_index: tuple[Tensor, ...], pos_target: Tensor, gamma: float = 2.0,
    duplicate_target: str = "last",
) -> Tensor:
    """IoU-aware BCE summed over every (query, class) entry (Align-DETR;.

    A positive entry (b, q, c) has the soft target t' and the loss -t'·log p - (1-t')·log(1-p);
    every other entry is a negative with -p^gamma·log(1-p), the p^gamma factor **not** detached
    (as the official code). Logarithms are log-sigmoids, so logits of ±200 give finite losses and
    gradients (the official ``prob.log()`` gives 0·inf = NaN there).

    Two positives may name the same entry: in the one-to-many assignment a query can be positive
    for two GTs of the same class. The official code writes both targets with an
    indexed assignment, ``pos_weights[pos_idx_c] = t``, so on CPU the last write wins. With the
    default ``duplicate_target="last"`` the entry takes the target of the later positive in the
    given order (the official behaviour, made deterministic on every device); with ``"max"`` it
    takes the larger of the targets. Each such pair still gets its own box terms.

    Args:
        logits: (B, Q, C) classification logits.
        pos_index: (batch_idx, query_idx, class_idx), each (K,) int64: the positive entries.
        pos_target: (K,) soft targets t' (already rank-weighted where that applies), detached.
        gamma: exponent of the negatives' p^gamma weight.
        duplicate_target: ``"last"`` (official) or ``"max"``, the target of an entry named twice.
    Returns:
        scalar: the sum over all B·Q·C entries (not normalised).
    """
    if duplicate_target not in DUPLICATE_TARGETS:
        raise ValueError(f"ia_bce_loss: duplicate_target must be one of {DUPLICATE_TARGETS} (official "
                         f"\"last\"); got {duplicate_target!r}")
    logits = _at_least_float32(logits)
    # Every entry as a negative, then the few positives swapped in: the B·Q·C-sized work is three
    # element-wise ops, and the swap cancels the negative term's gradient exactly (+g - g).
    negative = torch.sigmoid(logits).pow(gamma) * -F.logsigmoid(-logits)
    loss = negative.sum()
    if pos_index[0].numel() == 0:
        return loss
    flat, target, keep = _distinct_positives(logits, pos_index, pos_target.detach(), duplicate_target)
    x = logits.reshape(-1)[flat]
    positive = -(target * F.logsigmoid(x) + (1 - target) * F.logsigmoid(-x))
    return loss + torch.where(keep, positive - negative.reshape(-1)[flat], 0).sum()


def sigmoid_focal_loss(logits: Tensor, pos_index: tuple[Tensor, ...], alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """RetinaNet's sigmoid focal loss summed over all entries, binary targets.

    The target is 1 at the entries of ``pos_index`` (an entry named twice is still 1) and 0
    elsewhere; ℓ = alpha_t · (1 - p_t)^gamma · BCE(logit, target) with p_t = p·y + (1-p)·(1-y),
    alpha_t = alpha·y + (1-alpha)·(1-y) (no alpha weighting when alpha < 0). The BCE is taken
    from log-sigmoids, so it is finite for any finite logit. The official code returns
    ``mean over queries · number of queries``, i.e. this sum.

    Args:
        logits: (B, Q, C); pos_index: (batch_idx, query_idx, class_idx), each (K,) int64.
    Returns:
        scalar: the sum over all B·Q·C entries (not normalised).
    """
    logits = _at_least_float32(logits)
    neg_alpha, pos_alpha = (1 - alpha, alpha) if alpha >= 0 else (1.0, 1.0)
    # y = 0 everywhere first: (1-alpha)·p^gamma·(-log(1-p)); then the positives swapped in
    negative = neg_alpha * torch.sigmoid(logits).pow(gamma) * -F.logsigmoid(-logits)
    loss = negative.sum()
    if pos_index[0].numel() == 0:
        return loss
    flat, _, keep = _distinct_positives(logits, pos_index, logits.new_ones(pos_index[0].shape[0]))
    x = logits.reshape(-1)[flat]
    positive = pos_alpha * torch.sigmoid(-x).pow(gamma) * -F.logsigmoid(x)
    return loss + torch.where(keep, positive - negative.reshape(-1)[flat], 0).sum()


def box_l1_loss(src_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_i w_i · ‖b_i − G_i‖₁ over the 4 cxcywh coordinates.

    Shapes: src_boxes (K, 4), target_boxes (K, 4), weights (K,) or None (all 1) -> scalar.
    """
    src_boxes = _at_least_float32(src_boxes)
    per_box = (src_boxes - target_boxes.to(src_boxes.dtype)).abs().sum(-1)
    if weights is not None:
        per_box = per_box * weights
    return per_box.sum()


def box_giou_loss(src_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_i w_i · (1 − GIoU(b_i, G_i)) for cxcywh boxes.

    Degenerate predicted boxes (zero or negative width/height) give a finite loss and gradient.
    Shapes: src_boxes (K, 4), target_boxes (K, 4), weights (K,) or None (all 1) -> scalar.
    """
    src_boxes = _at_least_float32(src_boxes)
    giou = elementwise_generalized_box_iou(
        box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes.to(src_boxes.dtype))
    )
    per_box = 1 - giou
    if weights is not None:
        per_box = per_box * weights
    return per_box.sum()


# ---- frozen from src/dac_detr/losses/matcher.py ----
class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class·C_cls + cost_bbox·L1 − cost_giou·GIoU.

    The class cost is the focal-style cost of Deformable DETR, evaluated at the GT class:
    ``alpha·(1−p)^gamma·(−log(p+1e-8)) − (1−alpha)·p^gamma·(−log(1−p+1e-8))`` with p the sigmoid
    probability (the 1e-8 is the official one, kept so that matching is identical).

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (official 2 / 5 / 2).
        focal_alpha, focal_gamma: the focal class cost's alpha and gamma (official 0.25 / 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0; "
                             "set at least one of them (the official values are 2, 5, 2)")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}")

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """Matching costs of every prediction with every (padded) GT of its own image.

        Args:
            pred_logits: (B, Q, C) logits; pred_boxes: (B, Q, 4) cxcywh in [0, 1].
            gt_labels: (B, M) int64 class ids; gt_boxes: (B, M, 4) cxcywh (M = the largest GT
                count of the batch; the padding columns are ignored by the caller).
        Returns:
            (B, Q, M) costs, lower is better.
        """
        if pred_logits.dtype in (torch.float16, torch.bfloat16):
            pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()
        gt_boxes = gt_boxes.to(pred_boxes.dtype)
        batch, num_queries = pred_logits.shape[:2]
        index = gt_labels[:, None, :].expand(batch, num_queries, gt_labels.shape[1])
        prob = torch.gather(pred_logits, 2, index).sigmoid()  # (B, Q, M): p of each GT's class
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos_cost = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        neg_cost = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        cost_cls = pos_cost - neg_cost
        cost_l1 = torch.cdist(pred_boxes, gt_boxes, p=1)
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(pred_boxes)[:, :, None, :], box_cxcywh_to_xyxy(gt_boxes)[:, None, :, :]
        )
        return self.cost_bbox * cost_l1 + self.cost_class * cost_cls - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
                ) -> list[tuple[Tensor, Tensor]]:
        """Match every image's predictions to its GTs.

        Args:
            pred_logits: (B, Q, C) logits; pred_boxes: (B, Q, 4) cxcywh.
            targets: B dicts with ``labels`` (M_b,) int64 and ``boxes`` (M_b, 4) cxcywh.
        Returns:
            B pairs ``(pred_idx, gt_idx)``, int64 (min(Q, M_b),) on the predictions' device,
            pred_idx ascending.
        """
        device = pred_logits.device
        batch, num_queries = pred_logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {batch} images of predictions but {len(targets)} targets")
        sizes = [int(t["labels"].shape[0]) for t in targets]
        max_gt = max(sizes, default=0)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if max_gt == 0 or num_queries == 0:
            return [(empty, empty) for _ in sizes]

        # pad every image to max_gt GTs (label 0, a unit box): padded columns are never read
        gt_labels = torch.zeros(batch, max_gt, dtype=torch.int64, device=device)
        gt_boxes = torch.full((batch, max_gt, 4), 0.5, dtype=pred_boxes.dtype, device=device)
        for b, (t, n) in enumerate(zip(targets, sizes)):
            gt_labels[b, :n] = t["labels"].to(device)
            gt_boxes[b, :n] = t["boxes"].to(device=device, dtype=pred_boxes.dtype)
        costs = self.cost_matrix(pred_logits, pred_boxes, gt_labels, gt_boxes).cpu().numpy()

        pred_all, gt_all = [], []
        for b, n in enumerate(sizes):
            block = costs[b, :, :n]
            if not np.isfinite(block).all():
                raise ValueError(
                    f"HungarianMatcher: the matching cost of image {b} has NaN/inf entries: the "
                    "predicted logits or boxes are not finite (a diverged model; lower the learning "
                    "rate or check for fp16 overflow), or a GT box is not finite (check the data)"
                )
            rows, cols = linear_sum_assignment(block)
            pred_all.append(rows)
            gt_all.append(cols)
        # one transfer for the whole batch, then split per image
        pred_idx = torch.as_tensor(np.concatenate(pred_all), dtype=torch.int64).to(device)
        gt_idx = torch.as_tensor(np.concatenate(gt_all), dtype=torch.int64).to(device)
        counts = [len(rows) for rows in pred_all]
        return list(zip(pred_idx.split(counts), gt_idx.split(counts)))


# ---- frozen from src/dac_detr/losses/assigner.py ----
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


# ---- frozen from src/dac_detr/losses/criterion.py ----
DEFAULT_WEIGHTS = {"cls": 1.0, "l1": 5.0, "giou": 2.0, "enc_cls": 2.0, "enc_l1": 5.0, "enc_giou": 2.0}
CLS_LOSSES = ("ia_bce", "focal")
BOX_SOURCES = ("o_decoder", "c_decoder")

Pairs = list[tuple[Tensor, Tensor]]  # per image: (query_idx, gt_idx)


class SetCriterion(nn.Module):
    """DAC-DETR's criterion: ``criterion(outputs, targets, generator=None) -> dict``.

    The returned dict holds ``loss_*`` terms, already weighted, whose sum is the training loss
    (names in docs/interfaces.md: ``loss_{o2o,o2m,dn_o,dn_c}_{cls,l1,giou}_{l}``,
    ``loss_enc_{cls,l1,giou}``), and ``stat_*`` detached diagnostics: ``stat_o2o_iou_{l}`` (mean
    IoU of the Hungarian-matched O-stream pairs) and ``stat_o2m_pos_per_gt_{l}`` (one-to-many
    positives per GT, averaged over the batch's GTs); both are 0 for a batch without GT.
    Branches whose outputs are absent (no ``c_outputs``, ``enc_outputs`` or ``dn_outputs``)
    have no terms at all.

    Classification (``cls_loss``):
        ``"ia_bce"`` (official ``dac_cdn_ice``): IoU-aware BCE on every decoder branch. A
        positive's target is t = p^alpha·IoU^(1-alpha) (clamped >= ``ia_bce_min_quality``,
        detached), with p and IoU from the branch's own logits and boxes. In the one-to-many
        branch t is further multiplied by the rank weight exp(-r/``rank_tau``), r = the rank of t
        among the positives of the same GT, and the same weight multiplies that pair's L1 and
        GIoU terms. If one (query, class) entry is positive for two GTs of the same class (a
        query shared in the one-to-many assignment,, ``duplicate_target``
        picks its target; both pairs keep their box terms, as in the official code.
        ``"focal"`` (the ``dac_cdn`` variant): sigmoid focal loss with one-hot targets on every
        decoder branch, and no rank weights (all box weights 1).
        The encoder always uses the focal loss, class-agnostic (target one-hot on channel 0).

    Args:
        num_classes: width C of the classifier (from the data set; no hard-coded 91).
        matcher: the Hungarian matcher (O-stream layers and the encoder).
        assigner: the one-to-many assigner for ``c_outputs``; ``None`` when DAC is off.
        cls_loss: ``"ia_bce"`` or ``"focal"``.
        weights: loss weights; keys ``cls, l1, giou`` (every decoder branch) and ``enc_cls,
            enc_l1, enc_giou``; missing keys take the official 1, 5, 2, 2, 5, 2.
        o2m_box_source: boxes the assigner's IoU uses: ``"o_decoder"`` (official,
            item 1) or ``"c_decoder"``. The one-to-many losses always use the C-stream's boxes.
        o2m_loss_scale: the one-to-many normaliser is N / o2m_loss_scale (official 1/3, from
            ``balance_num = 3``).
        rank_tau: temperature of the rank weights (official 1.5).
        ia_bce_alpha, ia_bce_gamma, ia_bce_min_quality: IA-BCE's quality exponent (0.25),
            negative exponent (2) and target floor (0.01).
        focal_alpha, focal_gamma: focal loss alpha / gamma (0.25 / 2).
        duplicate_target: the IA-BCE target of an entry that is positive for several GTs:
            ``"last"`` (default, the official behaviour: the official ``pos_weights[idx] = t``
            lets the last write win, and the positives come per image, by GT ascending, within a
            GT by descending assignment score, so the later GT's target wins; resolved here by a
            stable sort, the same on every device) or ``"max"`` (the larger target). The focal
            loss ignores it (its targets are all 1).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        assigner: OneToManyAssigner | None = None,
        cls_loss: str = "ia_bce",
        weights: Mapping[str, float] | None = None,
        o2m_box_source: str = "o_decoder",
        o2m_loss_scale: float = 1 / 3,
        rank_tau: float = 1.5,
        ia_bce_alpha: float = 0.25,
        ia_bce_gamma: float = 2.0,
        ia_bce_min_quality: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        duplicate_target: str = "last",
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1; got {num_classes}")
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"SetCriterion: cls_loss must be one of {CLS_LOSSES}; got {cls_loss!r}")
        if o2m_box_source not in BOX_SOURCES:
            raise ValueError(f"SetCriterion: o2m_box_source must be one of {BOX_SOURCES}; got {o2m_box_source!r}")
        if not float(o2m_loss_scale) > 0:
            raise ValueError(f"SetCriterion: o2m_loss_scale must be > 0 (official 1/3); got {o2m_loss_scale}")
        if not float(rank_tau) > 0:
            raise ValueError(f"SetCriterion: rank_tau must be > 0 (official 1.5); got {rank_tau}")
        if duplicate_target not in DUPLICATE_TARGETS:
            raise ValueError(f"SetCriterion: duplicate_target must be one of {DUPLICATE_TARGETS} "
                             f"(official 'last'); got {duplicate_target!r}")
        merged = dict(DEFAULT_WEIGHTS)
        for key, value in dict(weights or {}).items():
            if key not in DEFAULT_WEIGHTS:
                raise ValueError(f"SetCriterion: unknown loss weight {key!r}; the keys are {sorted(DEFAULT_WEIGHTS)}")
            merged[key] = float(value)
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.assigner = assigner
        self.cls_loss = cls_loss
        self.weights = merged
        self.o2m_box_source = o2m_box_source
        self.o2m_loss_scale = float(o2m_loss_scale)
        self.rank_tau = float(rank_tau)
        self.ia_bce_alpha = float(ia_bce_alpha)
        self.ia_bce_gamma = float(ia_bce_gamma)
        self.ia_bce_min_quality = float(ia_bce_min_quality)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.duplicate_target = duplicate_target

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, cls_loss={self.cls_loss!r}, weights={self.weights}, "
                f"o2m_box_source={self.o2m_box_source!r}, o2m_loss_scale={self.o2m_loss_scale:.4g}, "
                f"rank_tau={self.rank_tau}, duplicate_target={self.duplicate_target!r}")

    # ------------------------------------------------------------------------------------------
    def forward(self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]],
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute every loss term.

        Args:
            outputs: the detector's output dict (docs/interfaces.md).
            targets: B dicts with ``labels`` (M_b,) int64 in [0, num_classes) and ``boxes``
                (M_b, 4) normalised cxcywh.
            generator: drives the random positive cap of the one-to-many assigner.
        Returns:
            ``{loss_*: weighted scalar, stat_*: detached scalar}``.
        """
        o_layers = self._o_layers(outputs)
        device = o_layers[-1]["pred_logits"].device
        targets = self._checked_targets(targets, o_layers[-1]["pred_boxes"], device)
        mean_gt = self._mean_gt_over_processes(sum(int(t["labels"].shape[0]) for t in targets), device)
        normaliser = mean_gt.clamp(min=1)
        terms: dict[str, Tensor] = {}

        for layer_idx, layer in enumerate(o_layers):
            pairs = self.matcher(layer["pred_logits"], layer["pred_boxes"], targets)
            losses, iou = self._pair_losses(layer["pred_logits"], layer["pred_boxes"], targets, pairs,
                                            normaliser, rank_weighted=False)
            self._add_weighted(terms, "o2o", layer_idx, losses)
            terms[f"stat_o2o_iou_{layer_idx}"] = iou.mean() if iou.numel() else iou.new_zeros(())

        c_layers = outputs.get("c_outputs") or []
        if c_layers:
            self._one_to_many_terms(terms, c_layers, o_layers, targets, mean_gt, generator)

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs:
            self._denoising_terms(terms, dn_outputs, outputs.get("dn_meta"), targets, normaliser)

        enc = outputs.get("enc_outputs")
        if enc:
            self._encoder_terms(terms, enc, targets, normaliser)
        return terms

    # ------------------------------------------------------------------------------------------
    def _one_to_many_terms(self, terms: dict[str, Tensor], c_layers: list[dict[str, Tensor]],
                           o_layers: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
                           mean_gt: Tensor, generator: torch.Generator | None) -> None:
        if self.assigner is None:
            raise ValueError("SetCriterion: the outputs have `c_outputs` (DAC on) but the criterion has no "
                             "assigner; build it with assigner=OneToManyAssigner(...) or turn DAC off")
        if len(c_layers) != len(o_layers):
            raise ValueError(f"SetCriterion: {len(c_layers)} C-stream layers (`c_outputs`) but "
                             f"{len(o_layers)} O-stream layers (`aux_outputs` + last); they must match")
        normaliser = (mean_gt / self.o2m_loss_scale).clamp(min=1)  # official: 3N from balance_num = 3
        num_gt = sum(int(t["labels"].shape[0]) for t in targets)
        for layer_idx, (c_layer, o_layer) in enumerate(zip(c_layers, o_layers)):
            c_logits, c_boxes = self._checked_layer(c_layer, f"c_outputs[{layer_idx}]")
            source = o_layer["pred_boxes"] if self.o2m_box_source == "o_decoder" else c_boxes
            if source.shape[:2] != c_logits.shape[:2]:
                raise ValueError(f"SetCriterion: c_outputs[{layer_idx}] has {tuple(c_logits.shape[:2])} "
                                 f"(batch, queries) but the O-stream layer has {tuple(source.shape[:2])}")
            pairs = [
                self.assigner(c_logits[b], source[b], t["labels"], t["boxes"], generator=generator)
                for b, t in enumerate(targets)
            ]
            losses, _ = self._pair_losses(c_logits, c_boxes, targets, pairs, normaliser, rank_weighted=True)
            self._add_weighted(terms, "o2m", layer_idx, losses)
            num_pos = sum(int(q.numel()) for q, _ in pairs)
            terms[f"stat_o2m_pos_per_gt_{layer_idx}"] = torch.tensor(num_pos / max(num_gt, 1), device=c_logits.device)

    def _denoising_terms(self, terms: dict[str, Tensor], dn_outputs: Mapping[str, list],
                         dn_meta: Mapping[str, int] | None, targets: list[dict[str, Tensor]],
                         normaliser: Tensor) -> None:
        if not dn_meta:
            raise ValueError("SetCriterion: the outputs have `dn_outputs` but no `dn_meta` "
                             "({num_groups, single_pad, pad_size}); the detector must return both")
        num_groups, single_pad = int(dn_meta["num_groups"]), int(dn_meta["single_pad"])
        pad_size = 2 * single_pad * num_groups
        if int(dn_meta.get("pad_size", pad_size)) != pad_size:
            raise ValueError(f"SetCriterion: dn_meta is inconsistent: pad_size {dn_meta['pad_size']} != "
                             f"2 * single_pad {single_pad} * num_groups {num_groups}")
        device = normaliser.device
        pairs = self._denoising_pairs(targets, num_groups, single_pad, device)
        for stream in ("o", "c"):
            for layer_idx, layer in enumerate(dn_outputs.get(stream) or []):
                logits, boxes = self._checked_layer(layer, f"dn_outputs[{stream!r}][{layer_idx}]")
                if logits.shape[1] != pad_size:
                    raise ValueError(f"SetCriterion: dn_outputs[{stream!r}][{layer_idx}] has {logits.shape[1]} "
                                     f"slots but dn_meta says pad_size = {pad_size}")
                losses, _ = self._pair_losses(logits, boxes, targets, pairs, normaliser * num_groups,
                                              rank_weighted=False)
                self._add_weighted(terms, f"dn_{stream}", layer_idx, losses)

    @staticmethod
    def _denoising_pairs(targets: list[dict[str, Tensor]], num_groups: int, single_pad: int,
                         device: torch.device) -> Pairs:
        """Fixed DN pairing: slot 2kS + j is the positive copy of GT j (k < G, j < n_b)."""
        pairs = []
        for b, t in enumerate(targets):
            n = int(t["labels"].shape[0])
            if n > single_pad:
                raise ValueError(f"SetCriterion: image {b} has {n} GTs but dn_meta single_pad is {single_pad}; "
                                 "the DN queries were built for other targets")
            gt = torch.arange(n, device=device)
            slots = (torch.arange(num_groups, device=device) * 2 * single_pad)[:, None] + gt[None, :]
            pairs.append((slots.flatten(), gt.repeat(num_groups)))
        return pairs

    def _encoder_terms(self, terms: dict[str, Tensor], enc: Mapping[str, Tensor],
                       targets: list[dict[str, Tensor]], normaliser: Tensor) -> None:
        """Class-agnostic Hungarian over all encoder tokens; focal loss with class 0 as target."""
        logits, boxes = self._checked_layer(enc, "enc_outputs")
        agnostic = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
        pairs = self.matcher(logits, boxes, agnostic)
        batch_idx, query_idx, gt_idx = self._flatten_pairs(pairs)
        channel0 = torch.zeros_like(query_idx)
        cls = sigmoid_focal_loss(logits, (batch_idx, query_idx, channel0), self.focal_alpha, self.focal_gamma)
        l1, giou = self._box_terms(boxes, batch_idx, query_idx, self._gather_gt_boxes(targets, pairs), None)
        terms["loss_enc_cls"] = self.weights["enc_cls"] * cls / normaliser
        terms["loss_enc_l1"] = self.weights["enc_l1"] * l1 / normaliser
        terms["loss_enc_giou"] = self.weights["enc_giou"] * giou / normaliser

    # ------------------------------------------------------------------------------------------
    def _pair_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], pairs: Pairs,
                     normaliser: Tensor, rank_weighted: bool) -> tuple[dict[str, Tensor], Tensor]:
        """Classification, L1 and GIoU of one branch and layer, each divided by ``normaliser``.

        Args:
            logits: (B, Q, C); boxes: (B, Q, 4) cxcywh; pairs: per image (query_idx, gt_idx).
            rank_weighted: the one-to-many branch (rank weights on targets and boxes).
        Returns:
            ({"cls", "l1", "giou"} scalars, (K,) detached IoU of the K pairs).
        """
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: losses in float32
            logits, boxes = logits.float(), boxes.float()
        batch_idx, query_idx, gt_idx = self._flatten_pairs(pairs)
        labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, pairs)])
        gt_boxes = self._gather_gt_boxes(targets, pairs)
        with torch.no_grad():
            iou = paired_box_iou(boxes[batch_idx, query_idx].detach(), gt_boxes)
        box_weights = None
        if self.cls_loss == "ia_bce":
            with torch.no_grad():
                prob = logits[batch_idx, query_idx, labels].detach().sigmoid()
                quality = iou_aware_quality(prob, iou, self.ia_bce_alpha, self.ia_bce_min_quality)
                if rank_weighted:
                    # one group per (image, GT): offset each image's GT ids by the GTs before it
                    offsets = torch.tensor([0] + [int(t["labels"].shape[0]) for t in targets[:-1]],
                                           device=logits.device).cumsum(0)
                    box_weights = rank_weights(offsets[batch_idx] + gt_idx, quality, self.rank_tau)
                    quality = quality * box_weights
            cls = ia_bce_loss(logits, (batch_idx, query_idx, labels), quality, self.ia_bce_gamma,
                              self.duplicate_target)
        else:
            cls = sigmoid_focal_loss(logits, (batch_idx, query_idx, labels), self.focal_alpha, self.focal_gamma)
        l1, giou = self._box_terms(boxes, batch_idx, query_idx, gt_boxes, box_weights)
        return {"cls": cls / normaliser, "l1": l1 / normaliser, "giou": giou / normaliser}, iou

    @staticmethod
    def _box_terms(boxes: Tensor, batch_idx: Tensor, query_idx: Tensor, gt_boxes: Tensor,
                   weights: Tensor | None) -> tuple[Tensor, Tensor]:
        if batch_idx.numel() == 0:
            # no pair: keep a zero-valued path to the boxes so DDP sees the box heads as used
            zero = boxes.sum() * 0
            return zero, zero
        src = boxes[batch_idx, query_idx]
        return box_l1_loss(src, gt_boxes, weights), box_giou_loss(src, gt_boxes, weights)

    @staticmethod
    def _flatten_pairs(pairs: Pairs) -> tuple[Tensor, Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(pairs)])
        return batch_idx, torch.cat([q for q, _ in pairs]), torch.cat([g for _, g in pairs])

    @staticmethod
    def _gather_gt_boxes(targets: list[dict[str, Tensor]], pairs: Pairs) -> Tensor:
        return torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, pairs)])

    def _add_weighted(self, terms: dict[str, Tensor], branch: str, layer_idx: int,
                      losses: Mapping[str, Tensor]) -> None:
        for name, value in losses.items():
            terms[f"loss_{branch}_{name}_{layer_idx}"] = self.weights[name] * value

    @staticmethod
    def _mean_gt_over_processes(num_gt: int, device: torch.device) -> Tensor:
        """N: the GT count summed over all processes / world size (before the >= 1 clamp)."""
        count = torch.tensor(float(num_gt), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return count

    # ------------------------------------------------------------------------------------------
    def _checked_layer(self, layer: Mapping[str, Tensor], where: str) -> tuple[Tensor, Tensor]:
        if not isinstance(layer, Mapping) or "pred_logits" not in layer or "pred_boxes" not in layer:
            raise ValueError(f"SetCriterion: {where} must be a dict with `pred_logits` and `pred_boxes`")
        logits, boxes = layer["pred_logits"], layer["pred_boxes"]
        if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(f"SetCriterion: {where} needs pred_logits (B, Q, C) and pred_boxes (B, Q, 4); "
                             f"got {tuple(logits.shape)} and {tuple(boxes.shape)}")
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion: {where}.pred_logits has {logits.shape[-1]} classes but the "
                             f"criterion was built with num_classes={self.num_classes}; pass the data set's "
                             "num_classes to both the detector and the criterion")
        return logits, boxes

    def _o_layers(self, outputs: Mapping[str, Any]) -> list[dict[str, Tensor]]:
        """The O-stream layers 0..Ld-1: ``aux_outputs`` then the last layer."""
        if not isinstance(outputs, Mapping) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise ValueError("SetCriterion: `outputs` must be the detector's output dict with at least "
                             "`pred_logits` and `pred_boxes` (docs/interfaces.md)")
        layers = list(outputs.get("aux_outputs") or []) + [
            {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
        for layer_idx, layer in enumerate(layers):
            self._checked_layer(layer, f"O-stream layer {layer_idx}")
        return layers

    def _checked_targets(self, targets: list[dict[str, Tensor]], pred_boxes: Tensor,
                         device: torch.device) -> list[dict[str, Tensor]]:
        """Targets on the outputs' device, boxes in the predictions' dtype (float32 at least)."""
        batch_size = pred_boxes.shape[0]
        box_dtype = torch.float64 if pred_boxes.dtype == torch.float64 else torch.float32
        if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
            raise ValueError(f"SetCriterion: `targets` must be a list of {batch_size} dicts (one per image "
                             f"of the outputs); got {type(targets).__name__} of length {len(targets)}")
        checked = []
        for b, t in enumerate(targets):
            if "labels" not in t or "boxes" not in t:
                raise ValueError(f"SetCriterion: target {b} needs `labels` (N,) and `boxes` (N, 4); "
                                 f"it has {sorted(t)}")
            labels = torch.as_tensor(t["labels"], device=device).long()
            boxes = torch.as_tensor(t["boxes"], device=device).to(box_dtype)
            if labels.dim() != 1 or boxes.dim() != 2 or boxes.shape != (labels.shape[0], 4):
                raise ValueError(f"SetCriterion: target {b} has labels {tuple(labels.shape)} and boxes "
                                 f"{tuple(boxes.shape)}; expected (N,) and (N, 4)")
            checked.append({"labels": labels, "boxes": boxes})
        all_labels = torch.cat([t["labels"] for t in checked])
        if all_labels.numel():
            low, high = torch.stack([all_labels.min(), all_labels.max()]).tolist()  # one device sync
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"SetCriterion: target labels must lie in [0, {self.num_classes}); got the "
                                 f"range [{low}, {high}]; check num_classes and the data set's label mapping")
        return checked
