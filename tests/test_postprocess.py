"""PostProcess: the official NMS post-processing and the DETR top-k."""

from __future__ import annotations

import pytest
import torch

from dac_detr.evaluation import PostProcess


def logits_of(probs: torch.Tensor) -> torch.Tensor:
    return torch.logit(probs.clamp(1e-6, 1 - 1e-6))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    lt = torch.max(a[:2], b[:2])
    rb = torch.min(a[2:], b[2:])
    inter = (rb - lt).clamp(min=0).prod()
    union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
    return float(inter / union)


def reference_nms(pred_logits, pred_boxes, orig_size, iou_threshold, pre_topk, num_select):
    """The official NMSPostProcess for one image, written out as plain greedy loops."""
    q, c = pred_logits.shape
    h, w = orig_size
    scores = pred_logits.sigmoid().flatten()
    order = scores.argsort(descending=True)[: min(pre_topk, q * c)]
    kept = []
    for idx in order.tolist():
        query, label = divmod(idx, c)
        cx, cy, bw, bh = pred_boxes[query].tolist()
        box = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        if all(k[1] != label or iou(k[2], box) <= iou_threshold for k in kept):
            kept.append((float(scores[idx]), label, box))
    return kept[:num_select]


def test_nms_matches_a_plain_reference_and_handles_small_q_times_c():
    torch.manual_seed(0)
    q, c = 40, 3  # Q*C = 120 < 10000: the official code would crash here
    centres = torch.rand(6, 2) * 0.6 + 0.2
    # Queries cluster around 6 objects, so NMS has work to do.
    boxes = torch.cat([centres[torch.randint(0, 6, (q,))] + 0.02 * torch.randn(q, 2), 0.2 + 0.05 * torch.rand(q, 2)], dim=1)
    logits = torch.randn(1, q, c) * 2
    out = PostProcess("nms", num_select=20, nms_iou=0.5)(logits, boxes[None], torch.tensor([[300, 400]]))[0]
    expected = reference_nms(logits[0], boxes, (300, 400), 0.5, 10000, 20)
    assert len(out["scores"]) == len(expected) == 20
    assert len(reference_nms(logits[0], boxes, (300, 400), 0.5, 10000, 1000)) < q * c  # NMS removed pairs
    torch.testing.assert_close(out["scores"], torch.tensor([e[0] for e in expected]))
    assert out["labels"].tolist() == [e[1] for e in expected] and out["labels"].dtype == torch.int64
    torch.testing.assert_close(out["boxes"], torch.stack([e[2] for e in expected]), atol=1e-4, rtol=0)


def test_nms_suppresses_only_same_class_overlaps_above_the_threshold():
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4], [0.52, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4]]])
    # IoU(query 0, query 2) = 0.905 > 0.8, IoU(query 0, query 3) = 0.6 < 0.8.
    probs = torch.tensor([[[0.9, 0.0], [0.0, 0.8], [0.7, 0.0], [0.6, 0.0]]])
    out = PostProcess("nms")(logits_of(probs), boxes, torch.tensor([[100, 100]]))[0]
    kept = {(round(float(s), 3), int(l)) for s, l in zip(out["scores"], out["labels"])}
    assert (0.9, 0) in kept and (0.8, 1) in kept and (0.6, 0) in kept  # other class / low overlap survive
    assert (0.7, 0) not in kept  # same class, IoU 0.9: suppressed


def test_nms_pre_topk_and_num_select_limit_the_output():
    torch.manual_seed(1)
    logits, boxes = torch.randn(2, 50, 4), torch.rand(2, 50, 4) * 0.3 + 0.2
    sizes = torch.tensor([[100, 100], [50, 80]])
    out = PostProcess("nms", num_select=7, nms_iou=1.0)(logits, boxes, sizes)  # IoU 1.0: nothing suppressed
    assert [len(o["scores"]) for o in out] == [7, 7]
    out = PostProcess("nms", num_select=300, nms_iou=1.0, pre_topk=15)(logits, boxes, sizes)
    assert [len(o["scores"]) for o in out] == [15, 15]
    for b, o in enumerate(out):
        torch.testing.assert_close(o["scores"], logits[b].sigmoid().flatten().topk(15).values)


def test_topk_scores_labels_and_boxes_in_pixels():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    probs = torch.tensor([[[0.1, 0.9, 0.3], [0.8, 0.2, 0.05]]])
    out = PostProcess("topk", num_select=300)(logits_of(probs), boxes, torch.tensor([[200, 100]]))[0]
    # Q*C = 6 < 300: every pair, sorted by score.
    assert len(out["scores"]) == 6
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8, 0.3, 0.2, 0.1, 0.05]))
    assert out["labels"].tolist() == [1, 0, 2, 1, 0, 2]
    # Query 0 in a 100 (w) x 200 (h) image: x 40..60, y 60..140.
    torch.testing.assert_close(out["boxes"][0], torch.tensor([40.0, 60.0, 60.0, 140.0]))
    torch.testing.assert_close(out["boxes"][1], torch.tensor([0.0, 100.0, 50.0, 200.0]))
    two = PostProcess("topk", num_select=2)(logits_of(probs), boxes, torch.tensor([[200, 100]]))[0]
    assert two["labels"].tolist() == [1, 0]


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="method must be one of"):
        PostProcess("soft-nms")
    with pytest.raises(ValueError, match=r"orig_sizes must be \(B, 2\)"):
        PostProcess()(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="pred_boxes"):
        PostProcess()(torch.zeros(2, 5, 3), torch.zeros(2, 4, 4), torch.zeros(2, 2))
