"""The loss functions of DAC-DETR as plain functions of tensors (docs/method.md, "## Loss terms and weights", "## IA-BCE").

The loss functions return an un-normalised **sum**; the criterion divides by the normaliser of the
branch (N, N / loss_scale or N·G). Nothing here keeps state: the rank weight of a one-to-many
positive is computed by :func:`rank_weights` and passed to the box losses explicitly (the
official code handed it over through ``self.loc_weight``, which depended on call order).

Half-precision inputs are computed in float32; float32 and float64 inputs keep their dtype.
"""

from __future__ import annotations

import math

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


def check_duplicate_target(duplicate_target: str, where: str) -> None:
    """The one check of a ``duplicate_target`` setting (criterion, IA-BCE, positives)."""
    if duplicate_target not in DUPLICATE_TARGETS:
        raise ValueError(f"{where}: duplicate_target must be one of {DUPLICATE_TARGETS} (official 'last'); "
                         f"got {duplicate_target!r}")


def _flat_entries(logits: Tensor, pos_index: tuple[Tensor, ...]) -> Tensor:
    """(index per dim of ``logits``, each (K,)) -> (K,) flat indices into ``logits.reshape(-1)``."""
    if len(pos_index) != logits.dim():
        raise ValueError(f"pos_index has {len(pos_index)} index tensors for logits of shape {tuple(logits.shape)}; "
                         "give one per dimension: (batch, query, class), or (layer, batch, query, class)")
    flat = pos_index[0]
    for size, index in zip(logits.shape[1:], pos_index[1:]):
        flat = flat * size + index
    return flat


def _distinct_positives(logits: Tensor, pos_index: tuple[Tensor, ...], pos_target: Tensor,
                        duplicate_target: str = "last") -> tuple[Tensor, Tensor, Tensor]:
    """The positive entries as flat indices into ``logits``, one target per entry:
    (K,) per dim -> flat (K,), target (K,), keep (K,) bool (one True per entry).

    An entry named by several positives takes, with ``duplicate_target``:
        ``"last"`` (default, the official behaviour): the target of the **last** of them in the
            given order (the official ``pos_weights[pos_idx_c] = t`` on CPU);
        ``"max"``: the largest of their targets.
    The positives are sorted stably by entry (for ``"max"``, after a stable sort by target), so
    the last of each entry's run is the one kept; this does not rely on how an indexed
    assignment resolves duplicate indices, and gives the same result on every device.
    (No ``torch.unique``: it would wait for the GPU on every call.)
    """
    check_duplicate_target(duplicate_target, "positives")
    flat = _flat_entries(logits, pos_index)
    if duplicate_target == "max":
        by_target = torch.sort(pos_target, stable=True).indices
        order = by_target[torch.sort(flat[by_target], stable=True).indices]
    else:
        order = torch.sort(flat, stable=True).indices
    flat, target = flat[order], pos_target[order].to(logits.dtype)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[:-1] = flat[1:] != flat[:-1]
    return flat, target, keep


def _summed(values: Tensor, per_layer: bool) -> Tensor:
    """Sum of all entries, or with ``per_layer`` of each index of the first dim: (L,)."""
    return values.flatten(1).sum(1) if per_layer else values.sum()


def _add_positives(loss: Tensor, logits: Tensor, flat: Tensor, contribution: Tensor, per_layer: bool) -> Tensor:
    """loss + the positives' (K,) contributions, per layer (first dim of ``logits``) or in total."""
    if not per_layer:
        return loss + contribution.sum()
    return loss.index_add(0, flat // math.prod(logits.shape[1:]), contribution)


def ia_bce_loss(
    logits: Tensor, pos_index: tuple[Tensor, ...], pos_target: Tensor, gamma: float = 2.0,
    duplicate_target: str = "last", per_layer: bool = False,
) -> Tensor:
    """IoU-aware BCE summed over every (query, class) entry (Align-DETR; docs/method.md, "## IA-BCE").

    A positive entry (b, q, c) has the soft target t' and the loss -t'·log p - (1-t')·log(1-p);
    every other entry is a negative with -p^gamma·log(1-p), the p^gamma factor **not** detached
    (as the official code). Logarithms are log-sigmoids, so logits of ±200 give finite losses and
    gradients (the official ``prob.log()`` gives 0·inf = NaN there).

    Two positives may name the same entry: in the one-to-many assignment a query can be positive
    for two GTs of the same class (docs/method.md, "## Official quirks as options"). The official
    code writes both targets with an indexed assignment, ``pos_weights[pos_idx_c] = t``, so on
    CPU the last write wins. With the default ``duplicate_target="last"`` the entry takes the
    target of the later positive in the given order (the official behaviour, made deterministic
    on every device); with ``"max"`` it takes the larger of the targets. Each such pair still
    gets its own box terms.

    Args:
        logits: (B, Q, C) classification logits, or (L, B, Q, C) for L stacked decoder layers.
        pos_index: one (K,) int64 index tensor per dim of ``logits``: (batch_idx, query_idx,
            class_idx), or (layer_idx, batch_idx, query_idx, class_idx).
        pos_target: (K,) soft targets t' (already rank-weighted where that applies), detached.
        gamma: exponent of the negatives' p^gamma weight.
        duplicate_target: ``"last"`` (official) or ``"max"``, the target of an entry named twice.
        per_layer: return the (L,) sums of the L stacked layers instead of the total.
    Returns:
        the sum over all entries (not normalised): a scalar, or (L,) with ``per_layer``.
    """
    check_duplicate_target(duplicate_target, "ia_bce_loss")
    logits = _at_least_float32(logits)
    # Every entry as a negative, then the few positives swapped in: the whole-tensor work is three
    # element-wise ops, and the swap cancels the negative term's gradient exactly (+g - g).
    negative = torch.sigmoid(logits).pow(gamma) * -F.logsigmoid(-logits)
    loss = _summed(negative, per_layer)
    if pos_index[0].numel() == 0:
        return loss
    flat, target, keep = _distinct_positives(logits, pos_index, pos_target.detach(), duplicate_target)
    x = logits.reshape(-1)[flat]
    positive = -(target * F.logsigmoid(x) + (1 - target) * F.logsigmoid(-x))
    return _add_positives(loss, logits, flat, torch.where(keep, positive - negative.reshape(-1)[flat], 0), per_layer)


def sigmoid_focal_loss(logits: Tensor, pos_index: tuple[Tensor, ...], alpha: float = 0.25,
                       gamma: float = 2.0, per_layer: bool = False) -> Tensor:
    """RetinaNet's sigmoid focal loss summed over all entries, binary targets (docs/method.md,
    "## Loss terms and weights").

    The target is 1 at the entries of ``pos_index`` (an entry named twice is still 1) and 0
    elsewhere; ℓ = alpha_t · (1 - p_t)^gamma · BCE(logit, target) with p_t = p·y + (1-p)·(1-y),
    alpha_t = alpha·y + (1-alpha)·(1-y) (no alpha weighting when alpha < 0). The BCE is taken
    from log-sigmoids, so it is finite for any finite logit. The official code returns
    ``mean over queries · number of queries``, i.e. this sum.

    Args:
        logits: (B, Q, C), or (L, B, Q, C) for L stacked layers; pos_index: one (K,) int64 index
            tensor per dim of ``logits``; per_layer: return the (L,) per-layer sums.
    Returns:
        the sum over all entries (not normalised): a scalar, or (L,) with ``per_layer``.
    """
    logits = _at_least_float32(logits)
    neg_alpha, pos_alpha = (1 - alpha, alpha) if alpha >= 0 else (1.0, 1.0)
    # y = 0 everywhere first: (1-alpha)·p^gamma·(-log(1-p)); then the positives swapped in
    negative = neg_alpha * torch.sigmoid(logits).pow(gamma) * -F.logsigmoid(-logits)
    loss = _summed(negative, per_layer)
    if pos_index[0].numel() == 0:
        return loss
    flat, _, keep = _distinct_positives(logits, pos_index, logits.new_ones(pos_index[0].shape[0]))
    x = logits.reshape(-1)[flat]
    positive = pos_alpha * torch.sigmoid(-x).pow(gamma) * -F.logsigmoid(x)
    return _add_positives(loss, logits, flat, torch.where(keep, positive - negative.reshape(-1)[flat], 0), per_layer)


def _pair_sum(per_box: Tensor, weights: Tensor | None, layer_idx: Tensor | None, num_layers: int) -> Tensor:
    if weights is not None:
        per_box = per_box * weights
    if layer_idx is None:
        return per_box.sum()
    return per_box.new_zeros(num_layers).index_add(0, layer_idx, per_box)


def box_l1_loss(src_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None,
                layer_idx: Tensor | None = None, num_layers: int = 0) -> Tensor:
    """Σ_i w_i · ‖b_i − G_i‖₁ over the 4 cxcywh coordinates (docs/method.md, "## Loss terms and weights").

    Shapes: src_boxes (K, 4), target_boxes (K, 4), weights (K,) or None (all 1) -> scalar; with
    ``layer_idx`` (K,) int64 in [0, num_layers): the (num_layers,) sums of each layer's pairs.
    """
    src_boxes = _at_least_float32(src_boxes)
    per_box = (src_boxes - target_boxes.to(src_boxes.dtype)).abs().sum(-1)
    return _pair_sum(per_box, weights, layer_idx, num_layers)


def box_giou_loss(src_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None,
                  layer_idx: Tensor | None = None, num_layers: int = 0) -> Tensor:
    """Σ_i w_i · (1 − GIoU(b_i, G_i)) for cxcywh boxes (docs/method.md, "## Loss terms and weights").

    Degenerate predicted boxes (zero or negative width/height) give a finite loss and gradient.
    Shapes: src_boxes (K, 4), target_boxes (K, 4), weights (K,) or None (all 1) -> scalar; with
    ``layer_idx``: the (num_layers,) per-layer sums, as :func:`box_l1_loss`.
    """
    src_boxes = _at_least_float32(src_boxes)
    giou = elementwise_generalized_box_iou(
        box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes.to(src_boxes.dtype))
    )
    return _pair_sum(1 - giou, weights, layer_idx, num_layers)


def paired_box_iou(src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """IoU of each predicted cxcywh box with its own target: (K, 4) x (K, 4) -> (K,)."""
    return elementwise_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes.to(src_boxes.dtype)))
