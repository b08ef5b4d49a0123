"""The batched criterion (all decoder layers of a branch at once) against the frozen per-layer
reference (tests/reference_criterion.py): every loss term, every statistic, every gradient, and
the one-to-many assignment with its random positive cap drawn from the same generator."""

from __future__ import annotations

import pytest
import torch

import reference_criterion as reference
from dac_detr.losses import HungarianMatcher, OneToManyAssigner, SetCriterion
from dac_detr.losses.pairs import PaddedTargets


def _layer(gen, batch, queries, classes, near=None):
    """Random logits and boxes; with ``near`` (B, M, 4) GT boxes, boxes jittered around them (so
    that many queries score above the one-to-many threshold and the positive cap is reached)."""
    logits = torch.randn(batch, queries, classes, generator=gen, dtype=torch.float64) * 2 - 1
    boxes = torch.cat([torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2,
                       torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.05], -1)
    if near is not None and near.shape[1] > 0:
        pick = torch.randint(0, near.shape[1], (batch, queries), generator=gen)
        base = torch.gather(near, 1, pick[..., None].expand(batch, queries, 4))
        boxes = (base + (torch.rand(batch, queries, 4, generator=gen, dtype=torch.float64) - 0.5) * 0.04).clamp(0.01, 0.99)
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


def _problem(seed, sizes, queries=90, classes=4, layers=3, near=True, dac=True, dn=True, enc_tokens=40):
    gen = torch.Generator().manual_seed(seed)
    targets = [{"labels": torch.randint(0, classes, (n,), generator=gen),
                "boxes": torch.cat([torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.05], -1)}
               for n in sizes]
    gt = PaddedTargets.from_targets(targets, torch.float64, torch.device("cpu")).boxes if near else None
    batch = len(sizes)
    o = [_layer(gen, batch, queries, classes, gt) for _ in range(layers)]
    out = {"pred_logits": o[-1]["pred_logits"], "pred_boxes": o[-1]["pred_boxes"], "aux_outputs": o[:-1]}
    if dac:
        out["c_outputs"] = [_layer(gen, batch, queries, classes, gt) for _ in range(layers)]
    if enc_tokens:
        out["enc_outputs"] = _layer(gen, batch, enc_tokens, classes)
    single_pad = max(sizes)
    if dn and single_pad:
        groups = max(1, 12 // single_pad)
        pad = 2 * single_pad * groups
        out["dn_outputs"] = {"o": [_layer(gen, batch, pad, classes) for _ in range(layers)]}
        if dac:
            out["dn_outputs"]["c"] = [_layer(gen, batch, pad, classes) for _ in range(layers)]
        out["dn_meta"] = {"num_groups": groups, "single_pad": single_pad, "pad_size": pad}
    return out, targets


def _leaves(x):
    if isinstance(x, torch.Tensor):
        return [x] if x.requires_grad else []
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return [leaf for item in items for leaf in _leaves(item)]


def _pair(criterion_kwargs, assigner_kwargs):
    new = SetCriterion(4, HungarianMatcher(), OneToManyAssigner(**assigner_kwargs), **criterion_kwargs)
    old = reference.SetCriterion(4, reference.HungarianMatcher(), reference.OneToManyAssigner(**assigner_kwargs),
                                 **criterion_kwargs)
    return new, old


def _run(criterion, outputs, targets, seed):
    leaves = _leaves(outputs)
    for leaf in leaves:
        leaf.grad = None
    terms = criterion(outputs, targets, generator=torch.Generator().manual_seed(seed))
    torch.stack([v for k, v in terms.items() if k.startswith("loss_")]).sum().backward()
    return terms, [leaf.grad.clone() for leaf in leaves]


CASES = {
    # name: (GT counts, criterion kwargs, assigner kwargs, problem kwargs)
    "official": ([7, 0, 12], {}, {}, {}),
    "cap_reached": ([9, 6], {}, {"threshold": 0.05, "max_positives": 75}, {}),
    "cap_small": ([5, 0, 4], {}, {"threshold": 0.2, "max_positives": 10}, {}),
    "focal_c_boxes": ([3, 8], {"cls_loss": "focal", "o2m_box_source": "c_decoder"}, {"threshold": 0.1}, {}),
    "dup_max_no_lowq": ([6, 2], {"duplicate_target": "max"}, {"low_quality_matches": False, "topk": 3}, {}),
    "no_objects": ([0, 0], {}, {}, {}),
    "more_gts_than_queries": ([12, 3], {}, {}, {"queries": 8, "enc_tokens": 10}),
    "random_boxes_no_dac": ([4, 5], {}, {}, {"near": False, "dac": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_criterion_equals_the_per_layer_reference(case):
    sizes, criterion_kwargs, assigner_kwargs, problem_kwargs = CASES[case]
    outputs, targets = _problem(3, sizes, **problem_kwargs)
    new, old = _pair(criterion_kwargs, assigner_kwargs)
    got, got_grads = _run(new, outputs, targets, seed=11)
    want, want_grads = _run(old, outputs, targets, seed=11)
    assert list(got) == list(want)  # the same terms in the same order
    for name in want:
        torch.testing.assert_close(got[name], want[name].to(got[name].dtype), rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{case}: {name}: {m}")
    for index, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, index=index: f"{case}: leaf {index}: {m}")


def test_the_cap_case_reaches_the_cap_and_draws_from_the_generator():
    """Guards the test above: its cap case really subsamples (else the draws were not compared)."""
    sizes, _, assigner_kwargs, _ = CASES["cap_reached"]
    outputs, targets = _problem(3, sizes)
    assigner = reference.OneToManyAssigner(**assigner_kwargs)
    logits, boxes = outputs["c_outputs"][0]["pred_logits"][0], outputs["aux_outputs"][0]["pred_boxes"][0]
    scores = assigner.scores(logits, boxes, targets[0]["labels"], targets[0]["boxes"])
    assert int((scores.max(0).values >= assigner.threshold).sum()) > 75
    first = assigner(logits, boxes, targets[0]["labels"], targets[0]["boxes"], torch.Generator().manual_seed(1))
    second = assigner(logits, boxes, targets[0]["labels"], targets[0]["boxes"], torch.Generator().manual_seed(2))
    assert not (first[0].shape == second[0].shape and torch.equal(first[0], second[0]))


def test_batched_assignment_equals_per_image_assignment():
    """assign_layers over (L, B) equals one assign_scores per layer and image, draws included."""
    gen = torch.Generator().manual_seed(0)
    sizes = (5, 0, 9)
    scores = torch.rand(2, 3, 9, 120, generator=gen, dtype=torch.float64)
    assigner = OneToManyAssigner(threshold=0.2, max_positives=30)
    pairs = assigner.assign_layers(scores, sizes, torch.Generator().manual_seed(5))
    per_image_generator = torch.Generator().manual_seed(5)
    for layer in range(2):
        got = pairs.per_image(layer, 3)
        for b, n in enumerate(sizes):
            want_q, want_g = reference.OneToManyAssigner(threshold=0.2, max_positives=30).assign_scores(
                scores[layer, b, :n], per_image_generator) if n else (torch.zeros(0, dtype=torch.long),) * 2
            assert torch.equal(got[b][0], want_q) and torch.equal(got[b][1], want_g)


def test_batched_matching_equals_per_image_matching():
    outputs, targets = _problem(5, [4, 0, 7], queries=12)
    logits = torch.stack([layer["pred_logits"] for layer in outputs["aux_outputs"]] + [outputs["pred_logits"]])
    boxes = torch.stack([layer["pred_boxes"] for layer in outputs["aux_outputs"]] + [outputs["pred_boxes"]])
    padded = PaddedTargets.from_targets(targets, torch.float64, torch.device("cpu"))
    pairs = HungarianMatcher().match_layers(logits, boxes, padded)
    for layer in range(logits.shape[0]):
        want = reference.HungarianMatcher()(logits[layer], boxes[layer], targets)
        for (got_q, got_g), (want_q, want_g) in zip(pairs.per_image(layer, 3), want):
            assert torch.equal(got_q, want_q) and torch.equal(got_g, want_g)


def test_float32_terms_agree_within_float_tolerance():
    """In float32 the stacked sums add in another order: equal up to rounding."""
    outputs, targets = _problem(7, [6, 3])
    for leaf in _leaves(outputs):
        leaf.data = leaf.data.float()
    targets = [{"labels": t["labels"], "boxes": t["boxes"].float()} for t in targets]
    new, old = _pair({}, {})
    got, got_grads = _run(new, outputs, targets, seed=2)
    want, want_grads = _run(old, outputs, targets, seed=2)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
