"""HungarianMatcher against brute force over all assignments, and its edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dac_detr.losses import HungarianMatcher


def _giou_scalar(a, b):
    """GIoU of two cxcywh boxes, written out by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _cost_scalar(logit, box, label, gt_box, w_cls=2.0, w_l1=5.0, w_giou=2.0, alpha=0.25, gamma=2.0):
    """The Hungarian cost (docs/method.md, Hungarian matching) of one (prediction, GT) pair, element
    by element."""
    p = 1 / (1 + math.exp(-logit[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, gt_box))
    return w_l1 * l1 + w_cls * (pos - neg) - w_giou * _giou_scalar(box, gt_box)


def _random_problem(gen, batch, queries, classes, sizes):
    logits = torch.randn(batch, queries, classes, generator=gen, dtype=torch.float64) * 2
    boxes = torch.cat([torch.rand(batch, queries, 2, generator=gen) * 0.6 + 0.2,
                       torch.rand(batch, queries, 2, generator=gen) * 0.3 + 0.05], -1).double()
    targets = [{"labels": torch.randint(0, classes, (n,), generator=gen),
                "boxes": torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=gen) * 0.3 + 0.05], -1).double()}
               for n in sizes]
    return logits, boxes, targets


def _brute_force_min(cost):
    """Minimal total cost over all one-to-one assignments of min(Q, M) pairs; cost (Q, M)."""
    q, m = len(cost), len(cost[0])
    if m <= q:
        return min(sum(cost[qi][g] for g, qi in enumerate(perm)) for perm in itertools.permutations(range(q), m))
    return min(sum(cost[qi][g] for qi, g in enumerate(perm)) for perm in itertools.permutations(range(m), q))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(0, 5, (1,), generator=gen)), 3]
    logits, boxes, targets = _random_problem(gen, 2, 5, 3, sizes)
    matcher = HungarianMatcher()
    result = matcher(logits, boxes, targets)
    for b, (pred_idx, gt_idx) in enumerate(result):
        n = sizes[b]
        cost = [[_cost_scalar(logits[b, q].tolist(), boxes[b, q].tolist(), int(targets[b]["labels"][g]),
                              targets[b]["boxes"][g].tolist()) for g in range(n)] for q in range(5)]
        assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
        assert len(pred_idx) == len(gt_idx) == min(5, n)
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(gt_idx.tolist())) == len(gt_idx)
        if n == 0:
            continue
        total = sum(cost[q][g] for q, g in zip(pred_idx.tolist(), gt_idx.tolist()))
        assert total == pytest.approx(_brute_force_min(cost), abs=1e-9)


def test_cost_matrix_is_the_elementwise_formula():
    gen = torch.Generator().manual_seed(7)
    logits, boxes, targets = _random_problem(gen, 1, 4, 3, [3])
    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=3.0, cost_giou=0.5)
    cost = matcher.cost_matrix(logits, boxes, targets[0]["labels"][None], targets[0]["boxes"][None])
    for q in range(4):
        for g in range(3):
            expected = _cost_scalar(logits[0, q].tolist(), boxes[0, q].tolist(), int(targets[0]["labels"][g]),
                                    targets[0]["boxes"][g].tolist(), 1.5, 3.0, 0.5)
            assert cost[0, q, g].item() == pytest.approx(expected, abs=1e-9)


def test_more_objects_than_queries():
    gen = torch.Generator().manual_seed(3)
    logits, boxes, targets = _random_problem(gen, 1, 3, 4, [5])
    pred_idx, gt_idx = HungarianMatcher()(logits, boxes, targets)[0]
    assert sorted(pred_idx.tolist()) == [0, 1, 2]
    cost = [[_cost_scalar(logits[0, q].tolist(), boxes[0, q].tolist(), int(targets[0]["labels"][g]),
                          targets[0]["boxes"][g].tolist()) for g in range(5)] for q in range(3)]
    total = sum(cost[q][g] for q, g in zip(pred_idx.tolist(), gt_idx.tolist()))
    assert total == pytest.approx(_brute_force_min(cost), abs=1e-9)


def test_no_objects_anywhere():
    logits = torch.randn(2, 4, 3)
    boxes = torch.rand(2, 4, 4)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    for pred_idx, gt_idx in HungarianMatcher()(logits, boxes, targets):
        assert pred_idx.numel() == 0 and gt_idx.numel() == 0


def test_extreme_logits_and_degenerate_boxes_still_match():
    logits = torch.tensor([[[200.0, -200.0], [-200.0, 200.0], [0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.2], [0.0, 0.0, 0.0, 0.0]]])
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.2], [0.5, 0.5, 0.2, 0.2]])}]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits, boxes, targets[0]["labels"][None], targets[0]["boxes"][None])
    assert torch.isfinite(cost).all()
    pred_idx, gt_idx = matcher(logits, boxes, targets)[0]
    assert dict(zip(gt_idx.tolist(), pred_idx.tolist())) == {0: 1, 1: 0}


def test_non_finite_predictions_give_a_clear_error():
    logits = torch.randn(1, 3, 2)
    logits[0, 1, 0] = float("nan")
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher()(logits, torch.rand(1, 3, 4), targets)


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)
