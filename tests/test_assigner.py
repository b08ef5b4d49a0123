"""OneToManyAssigner on hand-built score matrices whose answers are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from dac_detr.losses import OneToManyAssigner


def _assign(scores, generator=None, **kwargs):
    query_idx, gt_idx = OneToManyAssigner(**kwargs).assign_scores(torch.tensor(scores), generator)
    assert query_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
    return query_idx.tolist(), gt_idx.tolist()


def test_threshold_labelling_then_topk_per_gt():
    # per query: q0 -> g0 0.5 (pos), q1 -> g1 0.41 (pos), q2 -> g0 0.45 (pos), q3 -> 0.1 (neg)
    # n_g0 = 2: g0's two best queries q0 (0.5), q2 (0.45); n_g1 = 1: q1
    scores = [[0.5, 0.3, 0.45, 0.1],
              [0.2, 0.41, 0.3, 0.05]]
    assert _assign(scores, low_quality_matches=False, max_positives=None) == ([0, 2, 1], [0, 0, 1])


def test_threshold_is_inclusive():
    assert _assign([[0.4, 0.39]], low_quality_matches=False) == ([0], [0])
    assert _assign([[0.39, 0.38]], low_quality_matches=False) == ([], [])


def test_low_quality_forcing_keeps_the_argmax_gt():
    # q0 -> g0 0.9 positive. q1's best is g0 (0.38 < 0.4): negative by threshold, but it is g1's
    # best query, so it is forced positive -- and it keeps its argmax GT g0 (detectron2 rule as
    # the official code modifies it). So n_g0 = 2, n_g1 = 0: g1 gets no positive at all.
    scores = [[0.9, 0.38, 0.1],
              [0.05, 0.35, 0.2]]
    assert _assign(scores) == ([0, 1], [0, 0])
    assert _assign(scores, low_quality_matches=False) == ([0], [0])


def test_low_quality_forcing_below_threshold():
    # nothing reaches 0.4; each GT's best query is forced and is its own argmax
    scores = [[0.3, 0.1],
              [0.05, 0.2]]
    assert _assign(scores) == ([0, 1], [0, 1])
    assert _assign(scores, low_quality_matches=False) == ([], [])


def test_topk_takes_a_query_outside_the_positive_set():
    # q0 -> g0 0.9 (pos). q1 -> g0 0.33 (neg), forced as g1's best (0.30) but keeps g0.
    # q2 -> g0 0.36: negative and nobody's best. n_g0 = 2 -> g0's top-2 over ALL queries:
    # q0 (0.9) and q2 (0.36): q2 is outside the positive set and q1 (a positive) is not taken.
    scores = [[0.9, 0.33, 0.36],
              [0.05, 0.30, 0.1]]
    assert _assign(scores) == ([0, 2], [0, 0])


def test_topk_query_shared_by_two_gts():
    # argmax: q0->g0 0.9, q1->g1 0.85, q2->g0 0.7, q3->g0 0.6, q4->g1 0.5: all positive.
    # n_g0 = 3 -> g0's top-3 over all queries: q0 0.9, q1 0.8, q2 0.7 (q1 belongs to g1, q3 is dropped)
    # n_g1 = 2 -> q1 0.85, q4 0.5. q1 is assigned to both GTs.
    scores = [[0.9, 0.8, 0.7, 0.6, 0.1],
              [0.1, 0.85, 0.2, 0.3, 0.5]]
    assert _assign(scores, max_positives=None) == ([0, 1, 2, 1, 4], [0, 0, 0, 1, 1])


def test_topk_bounds_positives_per_gt():
    scores = [[0.9, 0.8, 0.7, 0.6, 0.5]]
    assert _assign(scores, topk=2) == ([0, 1], [0, 0])
    assert _assign(scores, topk=6) == ([0, 1, 2, 3, 4], [0, 0, 0, 0, 0])


def test_positive_cap_with_a_fixed_generator():
    # 8 positives, 4 per GT (queries 0-3 prefer g0, 4-7 prefer g1), cap 3.
    scores = torch.tensor([[0.90, 0.80, 0.70, 0.60, 0.10, 0.10, 0.10, 0.10],
                           [0.10, 0.10, 0.10, 0.10, 0.95, 0.85, 0.75, 0.65]])
    assigner = OneToManyAssigner(max_positives=3, topk=6)
    outcomes = set()
    for seed in range(8):
        # worked out here: the kept positives are positions perm[:3] of the 8 positives, drawn
        # from the generator; each GT then takes its n_g best queries
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))[:3]
        n_g0 = int((perm < 4).sum())
        expected = (list(range(n_g0)) + list(range(4, 4 + 3 - n_g0)), [0] * n_g0 + [1] * (3 - n_g0))
        got = assigner.assign_scores(scores, torch.Generator().manual_seed(seed))
        assert (got[0].tolist(), got[1].tolist()) == expected
        again = assigner.assign_scores(scores, torch.Generator().manual_seed(seed))
        assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
        outcomes.add(n_g0)
    assert len(outcomes) > 1, "the cap's random subset never changed the outcome"
    # no cap: all 8 positives -> 4 per GT
    uncapped = OneToManyAssigner(max_positives=None).assign_scores(scores)
    assert uncapped[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_cap_below_positive_count_does_not_draw():
    # with fewer positives than the cap the generator is not used: same result with any seed
    scores = torch.tensor([[0.9, 0.8, 0.1]])
    a = OneToManyAssigner(max_positives=75).assign_scores(scores, torch.Generator().manual_seed(1))
    b = OneToManyAssigner(max_positives=75).assign_scores(scores, torch.Generator().manual_seed(2))
    assert a[0].tolist() == b[0].tolist() == [0, 1]


def test_more_gts_than_queries():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7], [0.5, 0.6], [0.3, 0.3]])
    query_idx, gt_idx = OneToManyAssigner().assign_scores(scores)
    # q0 -> g0 (0.9) and q1 -> g2 (0.7) are positive; the forced best queries of g1 (q0), g3 (q1)
    # and g4 (q0, a tie broken by the lower index) are positive already and keep their argmax GT,
    # so n_g0 = 1, n_g2 = 1 and the other three GTs get nothing
    assert (query_idx.tolist(), gt_idx.tolist()) == ([0, 1], [0, 2])


def test_no_gt_and_no_query():
    assigner = OneToManyAssigner()
    empty = assigner(torch.randn(5, 3), torch.rand(5, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    assert empty[0].numel() == 0 and empty[1].numel() == 0
    none = assigner.assign_scores(torch.zeros(2, 0))
    assert none[0].numel() == 0


def test_scores_are_class_probability_plus_iou():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    gt_labels = torch.tensor([1, 0])
    gt_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    scores = OneToManyAssigner(score_weights=(0.3, 0.7)).scores(logits, boxes, gt_labels, gt_boxes)
    sig = torch.sigmoid
    # IoU of the two boxes, shifted by half a width: inter 0.1*0.2, union 0.06 -> 1/3
    expected = torch.tensor([[0.3 * sig(torch.tensor(-1.0)) + 0.7, 0.3 * sig(torch.tensor(3.0)) + 0.7 / 3],
                             [0.3 * sig(torch.tensor(2.0)) + 0.7 / 3, 0.3 * sig(torch.tensor(0.0)) + 0.7]])
    torch.testing.assert_close(scores, expected)


def test_forward_with_extreme_logits_and_degenerate_boxes():
    logits = torch.tensor([[200.0, -200.0], [-200.0, 200.0], [0.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.2, 0.2]])
    query_idx, gt_idx = OneToManyAssigner()(logits, boxes, torch.tensor([0, 1]),
                                            torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]))
    # g0: q0 0.3 + 0 -> forced; g1: q2 0.15 + 0.7 = 0.85 positive, q1 0.3
    assert (query_idx.tolist(), gt_idx.tolist()) == ([0, 2], [0, 1])


@pytest.mark.parametrize("kwargs, match", [
    ({"score_weights": (0.3,)}, "score_weights"),
    ({"topk": 0}, "topk"),
    ({"max_positives": 0}, "max_positives"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneToManyAssigner(**kwargs)
