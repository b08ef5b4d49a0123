"""The loss functions of DAC-DETR as plain functions of tensors (SPEC part 2, §4.2-§4.4, §4.6).

The loss functions return an un-normalised **sum**; the criterion divides by the normaliser of the
branch (N, N / loss_scale or N·G). Nothing here keeps state: the rank weight of a one-to-many
positive is computed by :func:`rank_weights` and passed to the box losses explicitly (the
official code handed it over through ``self.loc_weight``, which depended on call order).

Half-precision inputs are computed in float32; float32 and float64 inputs keep their dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dac_detr.boxes import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def iou_aware_quality(
    pos_prob: Tensor, pos_iou: Tensor, alpha: float = 0.25, min_quality: float = 0.01
) -> Tensor:
    """Align-DETR's quality target t = p^alpha · IoU^(1-alpha), clamped below, detached.

    Args:
        pos_prob: (K,) sigmoid probability of each positive at its GT class.
        pos_iou: (K,) IoU of each positive's predicted box with its GT box.
    Returns:
        (K,) targets in [min_quality, 1], without gradient (the official code detaches t).
    """
    with torch.no_grad():
        return (pos_prob.pow(alpha) * pos_iou.clamp(min=0).pow(1 - alpha)).clamp(min=min_quality)


def rank_within_groups(groups: Tensor, quality: Tensor) -> Tensor:
    """Rank of every entry inside its group by descending quality: 0 for the best.

    Args:
        groups: (K,) int64 group id of each entry (for the criterion: one id per (image, GT)).
        quality: (K,) the value ranked, higher first.
    Returns:
        (K,) int64 ranks. Ties keep the input order (stable sort), so for the one-to-many
        assignment, whose pairs come in descending assignment score within a GT, a tie of t
        (e.g. two positives at the 0.01 clamp) is broken by the assignment score.
    """
    if groups.numel() == 0:
        return groups.new_zeros(0)
    by_quality = torch.sort(quality, descending=True, stable=True).indices
    by_group = torch.sort(groups[by_quality], stable=True).indices
    order = by_quality[by_group]  # grouped, and within a group best first
    sorted_groups = groups[order]
    position = torch.arange(groups.numel(), device=groups.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    # the position where each entry's group begins (a running max, so no wait for the GPU)
    group_start = torch.cummax(torch.where(starts, position, 0), dim=0).values
    ranks = torch.empty_like(groups)
    ranks[order] = position - group_start
    return ranks


def rank_weights(groups: Tensor, quality: Tensor, tau: float = 1.5) -> Tensor:
    """Prime-sample weights exp(-r / tau), r = rank of the entry's quality within its group.

    With tau = 1.5 the weights of ranks 0..5 are 1, 0.513, 0.264, 0.135, 0.069, 0.036.
    Shapes: groups (K,), quality (K,) -> (K,) in quality's dtype.
    """
    return torch.exp(-rank_within_groups(groups, quality).to(quality.dtype) / tau)


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
    """IoU-aware BCE summed over every (query, class) entry (Align-DETR; SPEC §4.2).

    A positive entry (b, q, c) has the soft target t' and the loss -t'·log p - (1-t')·log(1-p);
    every other entry is a negative with -p^gamma·log(1-p), the p^gamma factor **not** detached
    (as the official code). Logarithms are log-sigmoids, so logits of ±200 give finite losses and
    gradients (the official ``prob.log()`` gives 0·inf = NaN there).

    Two positives may name the same entry: in the one-to-many assignment a query can be positive
    for two GTs of the same class (SPEC §7 item 3). The official code writes both targets with an
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
    """RetinaNet's sigmoid focal loss summed over all entries, binary targets (SPEC §4.6).

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
    """Σ_i w_i · ‖b_i − G_i‖₁ over the 4 cxcywh coordinates (SPEC §4.4).

    Shapes: src_boxes (K, 4), target_boxes (K, 4), weights (K,) or None (all 1) -> scalar.
    """
    src_boxes = _at_least_float32(src_boxes)
    per_box = (src_boxes - target_boxes.to(src_boxes.dtype)).abs().sum(-1)
    if weights is not None:
        per_box = per_box * weights
    return per_box.sum()


def box_giou_loss(src_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_i w_i · (1 − GIoU(b_i, G_i)) for cxcywh boxes (SPEC §4.4).

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


def paired_box_iou(src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """IoU of each predicted cxcywh box with its own target: (K, 4) x (K, 4) -> (K,)."""
    return elementwise_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes.to(src_boxes.dtype)))
