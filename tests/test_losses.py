"""The loss functions against direct element-wise formulas (float64), rank weights, box losses."""

from __future__ import annotations

import math

import pytest
import torch

from dac_detr.losses import (
    box_giou_loss,
    box_l1_loss,
    ia_bce_loss,
    iou_aware_quality,
    rank_weights,
    rank_within_groups,
    sigmoid_focal_loss,
)


def _positives(gen, batch, queries, classes, k):
    b = torch.randint(0, batch, (k,), generator=gen)
    q = torch.randperm(queries, generator=gen)[:k]  # distinct queries: no duplicate entries
    c = torch.randint(0, classes, (k,), generator=gen)
    return b, q, c


def _ia_bce_direct(logits, positives: dict, gamma=2.0):
    """Σ over entries of the IA-BCE formula (docs/method.md, IA-BCE), one entry at a time, in Python
    floats."""
    total = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in logits.shape)).tolist():
        p = 1 / (1 + math.exp(-logits[tuple(idx)].item()))
        if tuple(idx) in positives:
            t = positives[tuple(idx)]
            total += -t * math.log(p) - (1 - t) * math.log(1 - p)
        else:
            total += -(p ** gamma) * math.log(1 - p)
    return total


def test_ia_bce_matches_the_elementwise_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) * 3
    b, q, c = _positives(gen, 2, 5, 4, 4)
    t = torch.rand(4, generator=gen, dtype=torch.float64)
    got = ia_bce_loss(logits, (b, q, c), t, gamma=2.0)
    positives = {(int(bi), int(qi), int(ci)): float(ti) for bi, qi, ci, ti in zip(b, q, c, t)}
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_ia_bce_direct(logits, positives), rel=1e-12)
    # other gamma
    assert ia_bce_loss(logits, (b, q, c), t, gamma=1.5).item() == pytest.approx(
        _ia_bce_direct(logits, positives, gamma=1.5), rel=1e-12)


def test_ia_bce_gradient_matches_the_dense_formula():
    """The p^gamma weight of the negatives is NOT detached, the positive targets are."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 4, 3, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    b, q, c = _positives(gen, 1, 4, 3, 2)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    ia_bce_loss(logits, (b, q, c), t).backward()
    dense = logits.detach().clone().requires_grad_()
    p = dense.sigmoid()
    target = torch.zeros_like(dense)
    target[b, q, c] = t
    is_pos = torch.zeros_like(dense, dtype=torch.bool)
    is_pos[b, q, c] = True
    loss = torch.where(is_pos, -target * p.log() - (1 - target) * (1 - p).log(), -(p ** 2) * (1 - p).log()).sum()
    loss.backward()
    torch.testing.assert_close(logits.grad, dense.grad, rtol=1e-12, atol=1e-12)


def test_ia_bce_duplicate_entry_takes_the_last_target_by_default_or_the_larger():
    """An entry named by two positives: "last" (default, official ``pos_weights[idx] = t``) keeps
    the later positive's target, "max" the larger one; both give one positive term per entry."""
    logits = torch.tensor([[[0.3, -1.0], [2.0, 0.5]]], dtype=torch.float64)
    idx_dup = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 0]))
    idx_one = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    for targets, last, larger in (([0.3, 0.6], 0.6, 0.6), ([0.6, 0.3], 0.3, 0.6)):
        for mode, expected in (("last", last), ("max", larger)):
            a = logits.clone().requires_grad_()
            b = logits.clone().requires_grad_()
            kwargs = {} if mode == "last" else {"duplicate_target": "max"}  # "last" is the default
            dup = ia_bce_loss(a, idx_dup, torch.tensor(targets, dtype=torch.float64), **kwargs)
            one = ia_bce_loss(b, idx_one, torch.tensor([expected], dtype=torch.float64))
            assert dup.item() == pytest.approx(one.item(), rel=1e-14)
            assert dup.item() == pytest.approx(_ia_bce_direct(logits, {(0, 1, 0): expected}), rel=1e-12)
            dup.backward()
            one.backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=1e-14)
    # the two choices really differ here: the target 0.3 vs 0.6 changes the loss
    t = torch.tensor([0.6, 0.3], dtype=torch.float64)
    assert ia_bce_loss(logits, idx_dup, t).item() != pytest.approx(
        ia_bce_loss(logits, idx_dup, t, duplicate_target="max").item(), rel=1e-6)
    # among other positives, in any position; (0,1,0) three times, (0,0,0) twice
    idx = (torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 0, 0]))
    t = torch.tensor([0.2, 0.1, 0.7, 0.4, 0.5, 0.3], dtype=torch.float64)
    got_last = ia_bce_loss(logits, idx, t)
    got_max = ia_bce_loss(logits, idx, t, duplicate_target="max")
    assert got_last.item() == pytest.approx(
        _ia_bce_direct(logits, {(0, 0, 1): 0.2, (0, 1, 0): 0.5, (0, 0, 0): 0.3}), rel=1e-12)
    assert got_max.item() == pytest.approx(
        _ia_bce_direct(logits, {(0, 0, 1): 0.2, (0, 1, 0): 0.7, (0, 0, 0): 0.4}), rel=1e-12)
    with pytest.raises(ValueError, match="duplicate_target"):
        ia_bce_loss(logits, idx, t, duplicate_target="first")


def test_ia_bce_last_write_wins_on_random_duplicates():
    """Many duplicates in random order: "last" equals a Python loop of ``target[entry] = t``."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64) * 2
    k = 40
    b = torch.randint(0, 2, (k,), generator=gen)
    q = torch.randint(0, 3, (k,), generator=gen)
    c = torch.randint(0, 2, (k,), generator=gen)
    t = torch.rand(k, generator=gen, dtype=torch.float64)
    last, larger = {}, {}
    for entry, value in zip(zip(b.tolist(), q.tolist(), c.tolist()), t.tolist()):
        last[entry] = value
        larger[entry] = max(larger.get(entry, 0.0), value)
    assert last != larger
    assert ia_bce_loss(logits, (b, q, c), t).item() == pytest.approx(_ia_bce_direct(logits, last), rel=1e-12)
    assert ia_bce_loss(logits, (b, q, c), t, duplicate_target="max").item() == pytest.approx(
        _ia_bce_direct(logits, larger), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ia_bce_and_focal_extreme_logits_are_finite(dtype):
    logits = torch.tensor([[[200.0, -200.0, 100.0], [-200.0, 200.0, -100.0]]], dtype=dtype, requires_grad=True)
    idx = (torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([1, 0]))  # one positive at -200, one at +200
    t = torch.tensor([0.5, 0.9], dtype=dtype)
    loss = ia_bce_loss(logits, idx, t) + sigmoid_focal_loss(logits, idx)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # a confident wrong answer costs about |logit|: the positive at -200 contributes ~0.5 * 200
    assert loss.item() > 100


def _focal_direct(logits, positives: set, alpha, gamma):
    total = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in logits.shape)).tolist():
        x = logits[tuple(idx)].item()
        y = 1.0 if tuple(idx) in positives else 0.0
        p = 1 / (1 + math.exp(-x))
        ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        p_t = p * y + (1 - p) * (1 - y)
        a_t = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else 1.0
        total += a_t * (1 - p_t) ** gamma * ce
    return total


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.4, 1.0), (-1.0, 2.0)])
def test_focal_matches_the_elementwise_formula(alpha, gamma):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64) * 3
    b, q, c = _positives(gen, 2, 4, 3, 3)
    positives = {(int(bi), int(qi), int(ci)) for bi, qi, ci in zip(b, q, c)}
    got = sigmoid_focal_loss(logits, (b, q, c), alpha, gamma)
    assert got.item() == pytest.approx(_focal_direct(logits, positives, alpha, gamma), rel=1e-12)
    # an entry named twice is still a single positive
    twice = tuple(torch.cat([i, i[:1]]) for i in (b, q, c))
    assert sigmoid_focal_loss(logits, twice, alpha, gamma).item() == pytest.approx(got.item(), rel=1e-14)


def test_focal_gradient_matches_the_dense_formula():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, 5, 2, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    idx = (torch.tensor([0, 0]), torch.tensor([1, 3]), torch.tensor([0, 1]))
    sigmoid_focal_loss(logits, idx).backward()
    dense = logits.detach().clone().requires_grad_()
    y = torch.zeros_like(dense)
    y[idx] = 1
    p = dense.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(dense, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    (ce * (1 - p_t) ** 2 * (0.25 * y + 0.75 * (1 - y))).sum().backward()
    torch.testing.assert_close(logits.grad, dense.grad, rtol=1e-12, atol=1e-12)


def test_iou_aware_quality_formula_clamp_and_detach():
    p = torch.tensor([0.81, 0.5, 1e-6], requires_grad=True)
    iou = torch.tensor([0.64, 0.0, 0.9])
    t = iou_aware_quality(p, iou, alpha=0.25, min_quality=0.01)
    assert not t.requires_grad
    assert t[0].item() == pytest.approx(0.81 ** 0.25 * 0.64 ** 0.75)
    assert t[1].item() == pytest.approx(0.01)  # IoU 0 -> clamped
    assert t[2].item() == pytest.approx(max(0.01, 1e-6 ** 0.25 * 0.9 ** 0.75))


def test_rank_weights_on_a_known_group():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    quality = torch.tensor([0.2, 0.9, 0.5, 0.3, 0.3, 0.7, 0.1])
    # group 0: 0.9 (r0), 0.5 (r1), 0.2 (r2), 0.1 (r3); group 1: a tie keeps input order; group 2 alone
    assert rank_within_groups(groups, quality).tolist() == [2, 0, 1, 0, 1, 0, 3]
    w = rank_weights(groups, quality, tau=1.5)
    expected = torch.tensor([math.exp(-r / 1.5) for r in [2, 0, 1, 0, 1, 0, 3]])
    torch.testing.assert_close(w, expected)
    # the official table for ranks 0..5
    ranked = rank_weights(torch.zeros(6, dtype=torch.long), torch.linspace(1, 0.5, 6))
    torch.testing.assert_close(ranked, torch.tensor([1.0, 0.5134, 0.2636, 0.1353, 0.0695, 0.0357]), atol=1e-4, rtol=0)
    assert rank_within_groups(torch.zeros(0, dtype=torch.long), torch.zeros(0)).numel() == 0


def test_box_losses_with_weights():
    src = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    tgt = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], dtype=torch.float64)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert box_l1_loss(src, tgt, w).item() == pytest.approx(2 * 0.1 + 0.5 * 1.0)
    assert box_l1_loss(src, tgt).item() == pytest.approx(0.1 + 1.0)
    # pair 1: overlap 0.1 x 0.2, union 0.06, hull 0.3 x 0.2 = union -> GIoU = IoU = 1/3
    # pair 2: disjoint, union 0.08, hull 0.7 x 0.7 -> GIoU = -(0.49 - 0.08) / 0.49
    giou = [1 / 3, -(0.49 - 0.08) / 0.49]
    assert box_giou_loss(src, tgt, w).item() == pytest.approx(2 * (1 - giou[0]) + 0.5 * (1 - giou[1]))
    assert box_giou_loss(src, tgt).item() == pytest.approx((1 - giou[0]) + (1 - giou[1]))


def test_box_losses_on_degenerate_boxes_are_finite():
    src = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.3], [0.4, 0.4, -0.1, 0.2]], requires_grad=True)
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 3)
    loss = box_l1_loss(src, tgt) + box_giou_loss(src, tgt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(src.grad).all()
