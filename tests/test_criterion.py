"""SetCriterion on hand-built detector output dicts (docs/interfaces.md contract)."""

from __future__ import annotations

import math

import pytest
import torch

from dac_detr.losses import HungarianMatcher, OneToManyAssigner, SetCriterion, ia_bce_loss, sigmoid_focal_loss


# ---------------------------------------------------------------------------------------------
# helpers
def _layer(gen, batch, queries, classes, dtype=torch.float32):
    logits = torch.randn(batch, queries, classes, generator=gen, dtype=dtype) * 2 - 2
    boxes = torch.cat([torch.rand(batch, queries, 2, generator=gen, dtype=dtype) * 0.6 + 0.2,
                       torch.rand(batch, queries, 2, generator=gen, dtype=dtype) * 0.3 + 0.05], -1)
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


def _targets(gen, sizes, classes):
    return [{"labels": torch.randint(0, classes, (n,), generator=gen),
             "boxes": torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                                 torch.rand(n, 2, generator=gen) * 0.3 + 0.05], -1)} for n in sizes]


def _outputs(gen, targets, queries=6, classes=3, layers=2, dac=True, dn=True, enc_tokens=10):
    batch = len(targets)
    o = [_layer(gen, batch, queries, classes) for _ in range(layers)]
    out = {"pred_logits": o[-1]["pred_logits"], "pred_boxes": o[-1]["pred_boxes"], "aux_outputs": o[:-1]}
    if dac:
        out["c_outputs"] = [_layer(gen, batch, queries, classes) for _ in range(layers)]
    if enc_tokens:
        out["enc_outputs"] = _layer(gen, batch, enc_tokens, classes)
    single_pad = max(int(t["labels"].shape[0]) for t in targets)
    if dn and single_pad > 0:
        groups = max(1, 10 // single_pad)
        pad = 2 * single_pad * groups
        out["dn_outputs"] = {"o": [_layer(gen, batch, pad, classes) for _ in range(layers)]}
        if dac:
            out["dn_outputs"]["c"] = [_layer(gen, batch, pad, classes) for _ in range(layers)]
        out["dn_meta"] = {"num_groups": groups, "single_pad": single_pad, "pad_size": pad}
    return out


def _leaves(outputs):
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(outputs)
    return found


def _criterion(classes=3, dac=True, **kwargs):
    return SetCriterion(classes, HungarianMatcher(), OneToManyAssigner() if dac else None, **kwargs)


def _total(terms):
    return torch.stack([v for k, v in terms.items() if k.startswith("loss_")]).sum()


def _expected_names(layers, dac, dn, enc):
    branches = ["o2o"] + (["o2m"] if dac else []) + (["dn_o"] if dn else []) + (["dn_c"] if dn and dac else [])
    names = {f"loss_{b}_{n}_{l}" for b in branches for n in ("cls", "l1", "giou") for l in range(layers)}
    if enc:
        names |= {"loss_enc_cls", "loss_enc_l1", "loss_enc_giou"}
    return names


def _ia_bce_dense(logits, positives: dict, gamma=2.0):
    """The IA-BCE formula (docs/method.md, IA-BCE) over a dense tensor, {(b, q, c): t'}
    positives."""
    p = logits.double().sigmoid()
    total = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in logits.shape)).tolist():
        pi = p[tuple(idx)].item()
        if tuple(idx) in positives:
            t = positives[tuple(idx)]
            total += -t * math.log(pi) - (1 - t) * math.log(1 - pi)
        else:
            total += -(pi ** gamma) * math.log(1 - pi)
    return total


def _iou(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union, inter / union - (hull - union) / hull


def _sig(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# term names and totals
@pytest.mark.parametrize("dac", [True, False])
@pytest.mark.parametrize("dn", [True, False])
@pytest.mark.parametrize("enc", [True, False])
def test_term_names_for_each_combination_of_switches(dac, dn, enc):
    gen = torch.Generator().manual_seed(0)
    targets = _targets(gen, [2, 1], 3)
    outputs = _outputs(gen, targets, layers=2, dac=dac, dn=dn, enc_tokens=8 if enc else 0)
    terms = _criterion(dac=dac)(outputs, targets)
    assert {k for k in terms if k.startswith("loss_")} == _expected_names(2, dac, dn, enc)
    stats = {f"stat_o2o_iou_{l}" for l in range(2)} | ({f"stat_o2m_pos_per_gt_{l}" for l in range(2)} if dac else set())
    assert {k for k in terms if k.startswith("stat_")} == stats
    assert set(terms) == _expected_names(2, dac, dn, enc) | stats
    for k, v in terms.items():
        assert v.dim() == 0 and torch.isfinite(v), k
        if k.startswith("stat_"):
            assert not v.requires_grad, k


def test_official_configuration_has_75_terms():
    gen = torch.Generator().manual_seed(1)
    targets = _targets(gen, [3, 2], 5)
    outputs = _outputs(gen, targets, queries=8, classes=5, layers=6, enc_tokens=12)
    terms = _criterion(classes=5)(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert sum(k.startswith("loss_") for k in terms) == 75
    assert {k for k in terms if k.startswith("loss_")} == _expected_names(6, True, True, True)


def test_terms_are_weighted_and_the_total_is_their_sum():
    gen = torch.Generator().manual_seed(2)
    targets = _targets(gen, [2, 3], 3)
    outputs = _outputs(gen, targets)
    ones = {k: 1.0 for k in ("cls", "l1", "giou", "enc_cls", "enc_l1", "enc_giou")}
    unweighted = _criterion(weights=ones)(outputs, targets)
    weighted = _criterion()(outputs, targets)  # official 1 / 5 / 2 and encoder 2 / 5 / 2
    factor = {"cls": 1.0, "l1": 5.0, "giou": 2.0}
    expected_total = 0.0
    for name, value in unweighted.items():
        if not name.startswith("loss_"):
            continue
        kind = name.split("_")[-1] if name.startswith("loss_enc_") else name.split("_")[-2]
        w = {"cls": 2.0, "l1": 5.0, "giou": 2.0}[kind] if name.startswith("loss_enc_") else factor[kind]
        torch.testing.assert_close(weighted[name], w * value)
        expected_total += w * value.item()
    assert _total(weighted).item() == pytest.approx(expected_total, rel=1e-6)
    custom = _criterion(weights={"cls": 3.0})(outputs, targets)
    torch.testing.assert_close(custom["loss_o2o_cls_1"], 3 * unweighted["loss_o2o_cls_1"])
    torch.testing.assert_close(custom["loss_o2o_l1_1"], weighted["loss_o2o_l1_1"])


# ---------------------------------------------------------------------------------------------
# values worked out by hand
def test_one_to_one_terms_by_hand():
    gt = [0.5, 0.5, 0.2, 0.2]
    q0 = [0.55, 0.5, 0.2, 0.2]
    logits = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]], dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[q0, [0.2, 0.2, 0.1, 0.1]]], dtype=torch.float64, requires_grad=True)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([gt], dtype=torch.float64)}]
    for cls_loss in ("ia_bce", "focal"):
        terms = _criterion(classes=2, dac=False, cls_loss=cls_loss)(
            {"pred_logits": logits, "pred_boxes": boxes}, targets)
        iou, giou = _iou(q0, gt)
        assert iou == pytest.approx(0.6) and giou == pytest.approx(0.6)
        if cls_loss == "ia_bce":
            t = _sig(1.0) ** 0.25 * iou ** 0.75
            expected_cls = _ia_bce_dense(logits.detach(), {(0, 0, 1): t})
        else:
            idx = (torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
            expected_cls = sigmoid_focal_loss(logits.detach(), idx).item()
        # N = 1; weights 1 / 5 / 2
        assert terms["loss_o2o_cls_0"].item() == pytest.approx(expected_cls, rel=1e-10)
        assert terms["loss_o2o_l1_0"].item() == pytest.approx(5 * 0.05, rel=1e-10)
        assert terms["loss_o2o_giou_0"].item() == pytest.approx(2 * (1 - giou), rel=1e-10)
        assert terms["stat_o2o_iou_0"].item() == pytest.approx(0.6)


def _o2m_case():
    """One GT; the assigner (on O-boxes) takes q0, q1, q2 in that order; the C-boxes rank them
    differently by quality t."""
    gt = [0.5, 0.5, 0.4, 0.4]
    o_boxes = [gt, [0.52, 0.5, 0.4, 0.4], [0.55, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]
    c_boxes = [[0.6, 0.5, 0.4, 0.4], gt, [0.51, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]
    c_logits = [[2.0, -1.0], [1.0, 0.0], [0.0, 0.5], [-3.0, 1.0]]
    dt = torch.float64
    outputs = {
        "pred_logits": torch.zeros(1, 4, 2, dtype=dt, requires_grad=True),
        "pred_boxes": torch.tensor([o_boxes], dtype=dt, requires_grad=True),
        "c_outputs": [{"pred_logits": torch.tensor([c_logits], dtype=dt, requires_grad=True),
                       "pred_boxes": torch.tensor([c_boxes], dtype=dt, requires_grad=True)}],
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([gt], dtype=dt)}]
    return outputs, targets, gt, c_boxes, c_logits


def test_one_to_many_rank_weights_and_normaliser_by_hand():
    outputs, targets, gt, c_boxes, c_logits = _o2m_case()
    pairs = OneToManyAssigner()(outputs["c_outputs"][0]["pred_logits"][0], outputs["pred_boxes"][0],
                                targets[0]["labels"], targets[0]["boxes"])
    assert pairs[0].tolist() == [0, 1, 2] and pairs[1].tolist() == [0, 0, 0]
    t = [_sig(c_logits[q][0]) ** 0.25 * _iou(c_boxes[q], gt)[0] ** 0.75 for q in range(3)]
    order = sorted(range(3), key=lambda q: -t[q])
    assert order == [1, 2, 0]  # differs from the assignment order
    w = {q: math.exp(-r / 1.5) for r, q in enumerate(order)}
    normaliser = 3.0  # N = 1, loss_scale 1/3 -> 3N
    l1 = sum(w[q] * sum(abs(a - b) for a, b in zip(c_boxes[q], gt)) for q in range(3))
    giou = sum(w[q] * (1 - _iou(c_boxes[q], gt)[1]) for q in range(3))
    cls = _ia_bce_dense(outputs["c_outputs"][0]["pred_logits"].detach(), {(0, q, 0): w[q] * t[q] for q in range(3)})
    terms = _criterion(classes=2)(outputs, targets)
    assert terms["loss_o2m_l1_0"].item() == pytest.approx(5 * l1 / normaliser, rel=1e-10)
    assert terms["loss_o2m_giou_0"].item() == pytest.approx(2 * giou / normaliser, rel=1e-10)
    assert terms["loss_o2m_cls_0"].item() == pytest.approx(cls / normaliser, rel=1e-10)
    assert terms["stat_o2m_pos_per_gt_0"].item() == pytest.approx(3.0)
    # the loss scale only changes the normaliser
    unscaled = _criterion(classes=2, o2m_loss_scale=1.0)(outputs, targets)
    for kind in ("cls", "l1", "giou"):
        assert terms[f"loss_o2m_{kind}_0"].item() == pytest.approx(unscaled[f"loss_o2m_{kind}_0"].item() / 3)
    # focal variant: no rank weights on the boxes
    focal = _criterion(classes=2, cls_loss="focal")(outputs, targets)
    plain_l1 = sum(sum(abs(a - b) for a, b in zip(c_boxes[q], gt)) for q in range(3))
    assert focal["loss_o2m_l1_0"].item() == pytest.approx(5 * plain_l1 / normaliser, rel=1e-10)


def test_box_source_option():
    outputs, targets, gt, c_boxes, _ = _o2m_case()
    # with the C-boxes as the source, q1 (exactly on the GT) leads the assignment
    c_pairs = OneToManyAssigner()(outputs["c_outputs"][0]["pred_logits"][0], outputs["c_outputs"][0]["pred_boxes"][0],
                                  targets[0]["labels"], targets[0]["boxes"])
    assert c_pairs[0].tolist() == [1, 2, 0]
    # make the O-boxes useless: with o_decoder only the low-quality top-1 survives, with c_decoder not
    far = outputs["pred_boxes"].detach().clone()
    far[..., :2] = 0.05
    far[..., 2:] = 0.01
    outputs["pred_boxes"] = far.requires_grad_()
    o_terms = _criterion(classes=2, o2m_box_source="o_decoder")(outputs, targets)
    c_terms = _criterion(classes=2, o2m_box_source="c_decoder")(outputs, targets)
    assert o_terms["stat_o2m_pos_per_gt_0"].item() == 1.0
    assert c_terms["stat_o2m_pos_per_gt_0"].item() == 3.0


def test_same_class_gts_sharing_a_query():
    """docs/method.md, One-to-many assignment (a query shared by two GTs): q0 is the top query of
    both GTs (same class). The IA-BCE target of (q0, class 0) is, by default (official), the later
    GT's; with duplicate_target="max" the larger of the two. Both pairs' box terms count either
    way."""
    a, b = [0.5, 0.5, 0.4, 0.4], [0.55, 0.5, 0.4, 0.4]
    boxes = [[0.52, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]
    dt = torch.float64
    logits = torch.zeros(1, 3, 2, dtype=dt)
    logits[0, 0, 0] = 1.0  # p != 0.5, so the positive's loss depends on its target
    outputs = {"pred_logits": torch.zeros(1, 3, 2, dtype=dt, requires_grad=True),
               "pred_boxes": torch.tensor([boxes], dtype=dt),
               "c_outputs": [{"pred_logits": logits.clone().requires_grad_(),
                              "pred_boxes": torch.tensor([boxes], dtype=dt, requires_grad=True)}]}
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([a, b], dtype=dt)}]
    pairs = OneToManyAssigner()(logits[0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])
    assert pairs[0].tolist() == [0, 0] and pairs[1].tolist() == [0, 1]
    normaliser = 6.0  # N = 2 GTs, / (1/3)
    iou_a, giou_a = _iou(boxes[0], a)
    iou_b, giou_b = _iou(boxes[0], b)
    p = _sig(1.0)
    t_a, t_b = p ** 0.25 * iou_a ** 0.75, p ** 0.25 * iou_b ** 0.75  # one query per GT group: w = 1
    assert t_a > t_b  # GT b comes last: "last" gives t_b, "max" gives t_a
    cls_last = _ia_bce_dense(logits, {(0, 0, 0): t_b}) / normaliser
    cls_max = _ia_bce_dense(logits, {(0, 0, 0): t_a}) / normaliser
    assert cls_last != pytest.approx(cls_max, rel=1e-6)  # the choice matters in this scene
    l1 = sum(abs(x - y) for x, y in zip(boxes[0], a)) + sum(abs(x - y) for x, y in zip(boxes[0], b))
    default = _criterion(classes=2)(outputs, targets)
    for terms, cls in ((default, cls_last), (_criterion(classes=2, duplicate_target="last")(outputs, targets), cls_last),
                       (_criterion(classes=2, duplicate_target="max")(outputs, targets), cls_max)):
        assert terms["loss_o2m_cls_0"].item() == pytest.approx(cls, rel=1e-10)
        assert terms["loss_o2m_l1_0"].item() == pytest.approx(5 * l1 / normaliser, rel=1e-10)
        assert terms["loss_o2m_giou_0"].item() == pytest.approx(2 * ((1 - giou_a) + (1 - giou_b)) / normaliser,
                                                                rel=1e-10)
        assert terms["stat_o2m_pos_per_gt_0"].item() == 1.0
    # the focal loss ignores the option: its duplicate targets are all 1
    focal_last = _criterion(classes=2, cls_loss="focal")(outputs, targets)
    focal_max = _criterion(classes=2, cls_loss="focal", duplicate_target="max")(outputs, targets)
    for k in focal_last:
        torch.testing.assert_close(focal_last[k], focal_max[k], rtol=0, atol=0)


def test_denoising_pairing_and_normaliser():
    gen = torch.Generator().manual_seed(3)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.1]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.4, 0.1, 0.3]])}]
    single_pad, groups = 2, 3
    pad = 2 * single_pad * groups
    outputs = _outputs(gen, targets, layers=1, dac=True, dn=False, enc_tokens=0)
    layers = {}
    for stream in ("o", "c"):
        boxes = torch.rand(2, pad, 4, generator=gen) * 0.5 + 0.1  # negatives and padding: anything
        for b, t in enumerate(targets):
            for k in range(groups):
                for j, box in enumerate(t["boxes"]):
                    boxes[b, 2 * k * single_pad + j] = box + torch.tensor([0.01, 0.0, 0.0, 0.0])
        layers[stream] = [{"pred_logits": torch.randn(2, pad, 3, generator=gen), "pred_boxes": boxes}]
    outputs["dn_outputs"] = layers
    outputs["dn_meta"] = {"num_groups": groups, "single_pad": single_pad, "pad_size": pad}
    terms = _criterion()(outputs, targets)
    n = 3  # GTs in the batch
    # every positive slot is its GT shifted by 0.01 in cx: 9 pairs, normaliser N * G = 9
    assert terms["loss_dn_o_l1_0"].item() == pytest.approx(5 * 0.01 * groups * n / (n * groups), rel=1e-5)
    assert terms["loss_dn_c_l1_0"].item() == pytest.approx(5 * 0.01, rel=1e-5)
    ious = [(w - 0.01) / (w + 0.01) for w in (0.2, 0.2, 0.1)]  # same height: hull = union, GIoU = IoU
    assert terms["loss_dn_o_giou_0"].item() == pytest.approx(2 * groups * sum(1 - i for i in ious) / (n * groups),
                                                             rel=1e-5)
    # the DN classification: positives only at the paired slots
    positives = {}
    for b, t in enumerate(targets):
        for k in range(groups):
            for j in range(len(t["labels"])):
                slot = 2 * k * single_pad + j
                box = layers["o"][0]["pred_boxes"][b, slot].tolist()
                iou = _iou(box, t["boxes"][j].tolist())[0]
                prob = _sig(layers["o"][0]["pred_logits"][b, slot, int(t["labels"][j])].item())
                positives[(b, slot, int(t["labels"][j]))] = prob ** 0.25 * iou ** 0.75
    expected = _ia_bce_dense(layers["o"][0]["pred_logits"], positives) / (n * groups)
    assert terms["loss_dn_o_cls_0"].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# edge cases
def test_batch_without_objects_keeps_a_gradient_path_to_every_output():
    gen = torch.Generator().manual_seed(4)
    targets = _targets(gen, [0, 0], 3)
    outputs = _outputs(gen, targets, layers=2, dn=True, enc_tokens=8)
    assert "dn_outputs" not in outputs  # the detector gives no DN part without GTs
    terms = _criterion()(outputs, targets)
    assert {k for k in terms if k.startswith("loss_")} == _expected_names(2, True, False, True)
    for k, v in terms.items():
        assert torch.isfinite(v), k
    assert terms["stat_o2m_pos_per_gt_1"].item() == 0.0 and terms["stat_o2o_iou_1"].item() == 0.0
    assert terms["loss_o2o_cls_1"].item() > 0  # all-negative classification still trains
    _total(terms).backward()
    for tensor in _leaves(outputs):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    # with no GT the normaliser is 1 whatever the loss scale (the official clamp of 3N)
    again = _criterion(o2m_loss_scale=1.0)(outputs, targets)
    torch.testing.assert_close(again["loss_o2m_cls_0"], terms["loss_o2m_cls_0"])


def test_some_images_without_objects():
    gen = torch.Generator().manual_seed(5)
    targets = _targets(gen, [3, 0], 3)
    outputs = _outputs(gen, targets, layers=2, enc_tokens=8)
    terms = _criterion()(outputs, targets)
    assert set(k for k in terms if k.startswith("loss_")) == _expected_names(2, True, True, True)
    _total(terms).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in _leaves(outputs))


def test_more_objects_than_queries():
    gen = torch.Generator().manual_seed(6)
    targets = _targets(gen, [5, 4], 3)
    outputs = _outputs(gen, targets, queries=3, layers=2, enc_tokens=4)
    terms = _criterion()(outputs, targets)
    _total(terms).backward()
    assert all(torch.isfinite(v) for v in terms.values())


def test_a_gt_that_no_query_reaches():
    gen = torch.Generator().manual_seed(7)
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.98, 0.98, 0.01, 0.01]])}]
    outputs = _outputs(gen, targets, queries=5, layers=1, enc_tokens=6)
    for layer in [outputs] + outputs["c_outputs"]:
        boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.3]] * 5]) + torch.rand(1, 5, 4, generator=gen) * 0.02
        layer["pred_boxes"] = boxes.requires_grad_()
    # every query sits on GT 0: GT 1's best query is forced positive but keeps GT 0 as its match,
    # so GT 1 gets no one-to-many positive at all
    _, gt_idx = OneToManyAssigner()(outputs["c_outputs"][0]["pred_logits"][0], outputs["pred_boxes"][0],
                                    targets[0]["labels"], targets[0]["boxes"])
    assert gt_idx.numel() > 0 and 1 not in gt_idx.tolist()
    terms = _criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["stat_o2m_pos_per_gt_0"].item() == pytest.approx(gt_idx.numel() / 2)
    _total(terms).backward()
    assert all(torch.isfinite(t.grad).all() for t in _leaves(outputs))


def test_degenerate_predicted_boxes():
    gen = torch.Generator().manual_seed(8)
    targets = _targets(gen, [2, 1], 3)
    outputs = _outputs(gen, targets, layers=2, enc_tokens=6)
    for tensor in _leaves(outputs):
        if tensor.shape[-1] == 4:
            with torch.no_grad():
                tensor.zero_()  # every predicted box collapsed to the origin
    terms = _criterion()(outputs, targets)
    _total(terms).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(t.grad).all() for t in _leaves(outputs))


@pytest.mark.parametrize("cls_loss", ["ia_bce", "focal"])
def test_extreme_logits(cls_loss):
    gen = torch.Generator().manual_seed(9)
    targets = _targets(gen, [2, 2], 3)
    outputs = _outputs(gen, targets, layers=2, enc_tokens=6)
    for tensor in _leaves(outputs):
        if tensor.shape[-1] == 3:
            with torch.no_grad():
                tensor.copy_(torch.where(torch.rand(tensor.shape, generator=gen) < 0.5, -200.0, 200.0))
    terms = _criterion(cls_loss=cls_loss)(outputs, targets)
    _total(terms).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(t.grad).all() for t in _leaves(outputs))


def test_generator_makes_the_capped_assignment_repeatable():
    gen = torch.Generator().manual_seed(10)
    targets = _targets(gen, [3, 3], 3)
    outputs = _outputs(gen, targets, queries=30, layers=1, dn=False, enc_tokens=0)
    with torch.no_grad():  # make (nearly) every query a positive so the cap of 4 bites
        outputs["pred_boxes"].copy_(targets[0]["boxes"][torch.arange(30) % 3][None].expand(2, 30, 4))
    crit = SetCriterion(3, HungarianMatcher(), OneToManyAssigner(max_positives=4))
    a = crit(outputs, targets, generator=torch.Generator().manual_seed(1))
    b = crit(outputs, targets, generator=torch.Generator().manual_seed(1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert a["stat_o2m_pos_per_gt_0"].item() <= 4 / 3


# ---------------------------------------------------------------------------------------------
# bad input
def test_bad_input_gives_clear_errors():
    gen = torch.Generator().manual_seed(11)
    targets = _targets(gen, [1, 1], 3)
    outputs = _outputs(gen, targets, layers=1, enc_tokens=0)
    with pytest.raises(ValueError, match="num_classes=4"):
        _criterion(classes=4)(outputs, targets)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        _criterion()(outputs, [{"labels": torch.tensor([3]), "boxes": torch.rand(1, 4)}, targets[1]])
    with pytest.raises(ValueError, match="no assigner"):
        _criterion(dac=False)(outputs, targets)
    with pytest.raises(ValueError, match="list of 2 dicts"):
        _criterion()(outputs, targets[:1])
    with pytest.raises(ValueError, match="dn_meta"):
        _criterion()({**outputs, "dn_meta": None}, targets)
    with pytest.raises(ValueError, match="pred_logits"):
        _criterion()({"pred_boxes": outputs["pred_boxes"]}, targets)
    with pytest.raises(ValueError, match="cls_loss"):
        _criterion(cls_loss="softmax")
    with pytest.raises(ValueError, match="unknown loss weight"):
        _criterion(weights={"bbox": 5})
    with pytest.raises(ValueError, match="o2m_box_source"):
        _criterion(o2m_box_source="both")
    with pytest.raises(ValueError, match="duplicate_target must be one of"):
        _criterion(duplicate_target="first")


# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_outputs_give_the_cpu_values():
    """Everything follows the outputs' device; a CUDA generator drives the cap there."""
    gen = torch.Generator().manual_seed(12)
    targets = _targets(gen, [3, 1], 3)
    outputs = _outputs(gen, targets, queries=12, layers=2, enc_tokens=20)

    def to_cuda(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cuda().requires_grad_()
        if isinstance(x, dict):
            return {k: to_cuda(v) for k, v in x.items()}
        if isinstance(x, list):
            return [to_cuda(v) for v in x]
        return x

    crit = SetCriterion(3, HungarianMatcher(), OneToManyAssigner(max_positives=None))
    cpu = crit(outputs, targets)
    cuda_outputs = to_cuda(outputs)
    cuda = crit(cuda_outputs, [{k: v.cuda() for k, v in t.items()} for t in targets])
    assert set(cpu) == set(cuda)
    for k in cpu:
        assert cuda[k].device.type == "cuda"
        torch.testing.assert_close(cuda[k].cpu(), cpu[k], rtol=1e-4, atol=1e-5)
    _total(cuda).backward()
    capped = SetCriterion(3, HungarianMatcher(), OneToManyAssigner(max_positives=2))
    terms = capped(cuda_outputs, [{k: v.cuda() for k, v in t.items()} for t in targets],
                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert all(torch.isfinite(v) for v in terms.values())


def test_bfloat16_outputs_are_computed_in_float32():
    gen = torch.Generator().manual_seed(13)
    targets = _targets(gen, [2, 1], 3)
    outputs = _outputs(gen, targets, layers=2, enc_tokens=6)
    reference = _criterion()(outputs, targets)

    def to_bf16(x):
        if isinstance(x, torch.Tensor):
            return x.detach().bfloat16().requires_grad_()
        if isinstance(x, dict):
            return {k: to_bf16(v) for k, v in x.items()}
        if isinstance(x, list):
            return [to_bf16(v) for v in x]
        return x

    low = to_bf16(outputs)
    terms = _criterion(cls_loss="ia_bce")(low, targets)
    _total(terms).backward()
    for k, v in terms.items():
        assert v.dtype == torch.float32, k
        assert torch.isfinite(v), k
    # bf16 inputs (8 bits of mantissa) give the float32 values to about a percent
    torch.testing.assert_close(_total(terms), _total(reference).detach(), rtol=3e-2, atol=0)
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in _leaves(low))
