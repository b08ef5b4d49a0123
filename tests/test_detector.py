"""DACDETR on CPU with a tiny conv backbone: output contract, every switch, the DAC properties."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from dac_detr.boxes import inverse_sigmoid
from dac_detr.models import DACDETR
from tiny_backbone import TinyBackbone

NUM_CLASSES = 7
HIDDEN = 32


def tiny_model(**overrides) -> DACDETR:
    kwargs = dict(num_classes=NUM_CLASSES, hidden_dim=HIDDEN, nheads=4, num_encoder_layers=1, num_decoder_layers=3,
                  dim_feedforward=48, num_feature_levels=4, enc_n_points=2, dec_n_points=2, num_queries=12,
                  dn_number=6)
    kwargs.update(overrides)
    return DACDETR(TinyBackbone(), **kwargs)


def randomize_heads(model: DACDETR, seed: int = 0) -> None:
    """The official init zeroes the last box layer (all layers would predict the reference);
    perturb every head so the streams and layers give different, gradient-carrying outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in list(model.bbox_embed) + list(model.class_embed):
            for p in head.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def batch(sizes=((64, 96), (80, 64)), gt_counts=(3, 0), seed=0):
    """Images of different sizes padded bottom-right, the DETR mask, and targets (some empty)."""
    g = torch.Generator().manual_seed(seed)
    H = max(h for h, _ in sizes)
    W = max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, H, W)
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    targets = []
    for i, ((h, w), n) in enumerate(zip(sizes, gt_counts)):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": torch.cat([centre, wh], 1)})
    return images, mask, targets


def check_layer(layer: dict, batch_size: int, num: int) -> None:
    assert set(layer) == {"pred_logits", "pred_boxes"}
    assert layer["pred_logits"].shape == (batch_size, num, NUM_CLASSES)
    assert layer["pred_boxes"].shape == (batch_size, num, 4)
    assert torch.isfinite(layer["pred_logits"]).all()
    assert ((layer["pred_boxes"] >= 0) & (layer["pred_boxes"] <= 1)).all()


SWITCHES = list(itertools.product([True, False], repeat=6))  # two_stage, refine, mixed, lft, dn, dac


@pytest.mark.parametrize("two_stage,refine,mixed,lft,dn,dac", SWITCHES,
                         ids=["".join("TF"[not v] for v in s) for s in SWITCHES])
def test_every_switch_combination(two_stage, refine, mixed, lft, dn, dac):
    torch.manual_seed(0)
    Ld, Q = 2, 10
    model = tiny_model(two_stage=two_stage, with_box_refine=refine, mixed_selection=mixed, look_forward_twice=lft,
                       dn_number=5 if dn else 0, dac_enabled=dac, num_decoder_layers=Ld, num_queries=Q)
    randomize_heads(model)
    images, mask, targets = batch()
    model.train()
    out = model(images, mask, targets, generator=torch.Generator().manual_seed(0))

    expected = {"pred_logits", "pred_boxes", "aux_outputs"}
    expected |= {"enc_outputs"} if two_stage else set()
    expected |= {"c_outputs"} if dac else set()
    expected |= {"dn_outputs", "dn_meta"} if dn else set()
    assert set(out) == expected
    check_layer({k: out[k] for k in ("pred_logits", "pred_boxes")}, 2, Q)
    assert len(out["aux_outputs"]) == Ld - 1
    for layer in out["aux_outputs"] + out.get("c_outputs", []):
        check_layer(layer, 2, Q)
    if dac:
        assert len(out["c_outputs"]) == Ld
    if two_stage:
        tokens = sum(-(-80 // s) * -(-96 // s) for s in (8, 16, 32, 64))  # ceil-divided padded size
        enc = out["enc_outputs"]
        assert enc["pred_logits"].shape[:2] == enc["pred_boxes"].shape[:2] == (2, tokens)
    if dn:
        meta = out["dn_meta"]
        # 3 GT at most -> G = max(1, 5 // 3) = 1 group of 2*3 slots
        assert meta == {"num_groups": 1, "single_pad": 3, "pad_size": 6}
        assert set(out["dn_outputs"]) == ({"o", "c"} if dac else {"o"})
        for stream in out["dn_outputs"].values():
            assert len(stream) == Ld
            for layer in stream:
                check_layer(layer, 2, 6)

    # one backward through everything: every parameter gets a gradient (DDP needs a path for all)
    total = sum(v.sum() for v in _all_tensors(out))
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient path: {no_grad}"

    model.eval()
    with torch.no_grad():
        out_eval = model(images, mask)
    assert set(out_eval) == {"pred_logits", "pred_boxes", "aux_outputs"} | ({"enc_outputs"} if two_stage else set())
    check_layer({k: out_eval[k] for k in ("pred_logits", "pred_boxes")}, 2, Q)


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj[torch.isfinite(obj)]
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_tensors(v)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
def test_any_number_of_levels_points_heads_classes(levels):
    torch.manual_seed(0)
    model = tiny_model(num_feature_levels=levels, enc_n_points=3, dec_n_points=1, nheads=2, num_classes=NUM_CLASSES,
                       num_queries=5, num_decoder_layers=1)
    # levels beyond the 3 backbone maps are stride-2 convs, the first on the raw last map (24 ch)
    assert len(model.input_proj) == levels
    if levels > 3:
        assert model.input_proj[3][0].in_channels == 24 and model.input_proj[3][0].stride == (2, 2)
    if levels == 1:  # one level: the coarsest backbone map
        assert model.input_proj[0][0].in_channels == 24
    images, mask, targets = batch(sizes=((128, 128), (96, 112)), gt_counts=(2, 1))
    model.train()
    out = model(images, mask, targets)
    assert out["pred_logits"].shape == (2, 5, NUM_CLASSES)
    assert out["aux_outputs"] == []
    assert len(out["c_outputs"]) == 1


def test_batch_without_any_gt_has_no_dn_outputs_and_all_parameters_get_gradients():
    model = tiny_model()
    randomize_heads(model)
    images, mask, targets = batch(gt_counts=(0, 0))
    model.train()
    out = model(images, mask, targets)
    assert "dn_outputs" not in out and "dn_meta" not in out
    assert out["pred_logits"].shape == (2, 12, NUM_CLASSES)
    sum(v.sum() for v in _all_tensors(out)).backward()
    # the label book is not used by any query, yet it is part of the graph (exact zero gradient)
    assert model.label_enc.weight.grad is not None
    assert torch.count_nonzero(model.label_enc.weight.grad) == 0


def test_layer0_c_stream_equals_o_stream_and_streams_diverge_later():
    torch.manual_seed(0)
    model = tiny_model()
    randomize_heads(model)
    model.train()
    images, mask, targets = batch(gt_counts=(3, 2))
    out = model(images, mask, targets)
    o_layers = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    c_layers = out["c_outputs"]
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(c_layers[0][key], o_layers[0][key])
        assert torch.equal(out["dn_outputs"]["c"][0][key], out["dn_outputs"]["o"][0][key])
        for lid in (1, 2):
            assert not torch.allclose(c_layers[lid][key], o_layers[lid][key])
            assert not torch.allclose(out["dn_outputs"]["c"][lid][key], out["dn_outputs"]["o"][lid][key])

    # without sharing, the C-stream starts from the raw queries: layer 0 already differs
    model.share_layer0_self_attn = False
    out = model(images, mask, targets)
    assert not torch.allclose(out["c_outputs"][0]["pred_logits"], out["aux_outputs"][0]["pred_logits"])


@pytest.mark.parametrize("share", [True, False])
def test_c_stream_loss_gradients(share):
    torch.manual_seed(0)
    model = tiny_model(share_layer0_self_attn=share)
    randomize_heads(model)
    model.train()
    images, mask, targets = batch(gt_counts=(3, 2))
    out = model(images, mask, targets)
    loss = sum(layer["pred_logits"].sum() + layer["pred_boxes"].sum()
               for layer in out["c_outputs"] + out["dn_outputs"]["c"])
    loss.backward()

    def has_grad(module):
        grads = [p.grad for p in module.parameters()]
        return all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    for lid, layer in enumerate(model.transformer.decoder.layers):
        for name in ("cross_attn", "norm1", "linear1", "linear2", "norm3"):
            assert has_grad(getattr(layer, name)), f"layer {lid} {name}"
        assert has_grad(model.class_embed[lid]) and has_grad(model.bbox_embed[lid])
        reached = share and lid == 0
        for name in ("self_attn", "norm2"):
            grads = [p.grad for p in getattr(layer, name).parameters()]
            if reached:
                assert has_grad(getattr(layer, name)), f"layer 0 {name} must get C-stream gradients"
            else:
                assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), f"layer {lid} {name}"
    # the encoder, the queries and the label book are reached too (not detached)
    assert has_grad(model.transformer.encoder) and has_grad(model.query_embed) and has_grad(model.label_enc)


def test_o_stream_never_reads_the_c_stream():
    torch.manual_seed(0)
    with_dac = tiny_model(dac_enabled=True)
    randomize_heads(with_dac)
    without = tiny_model(dac_enabled=False)
    without.load_state_dict(with_dac.state_dict())
    images, mask, targets = batch(gt_counts=(3, 1))
    for mode in ("eval", "train"):
        outs = []
        for model in (with_dac, without):
            getattr(model, mode)()
            with torch.no_grad():
                outs.append(model(images, mask, targets if mode == "train" else None,
                                  generator=torch.Generator().manual_seed(3)))
        a, b = outs
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(a[key], b[key])
            for la, lb in zip(a["aux_outputs"], b["aux_outputs"]):
                assert torch.equal(la[key], lb[key])
            assert torch.equal(a["enc_outputs"][key], b["enc_outputs"][key])
        if mode == "train":
            assert "c_outputs" in a and "c_outputs" not in b
            for la, lb in zip(a["dn_outputs"]["o"], b["dn_outputs"]["o"]):
                assert torch.equal(la["pred_boxes"], lb["pred_boxes"])


def test_eval_does_not_compute_the_c_stream():
    model = tiny_model(num_decoder_layers=3)
    calls = []
    for layer in model.transformer.decoder.layers:
        layer.cross_attn.register_forward_hook(lambda *_: calls.append("cross"))
        layer.self_attn.register_forward_hook(lambda *_: calls.append("self"))
    images, mask, targets = batch()
    model.eval()
    with torch.no_grad():
        model(images, mask)
    assert calls.count("cross") == 3 and calls.count("self") == 3
    calls.clear()
    model.train()
    model(images, mask, targets)
    assert calls.count("cross") == 6 and calls.count("self") == 3  # C-stream: cross-attention only
    calls.clear()
    model.dac_enabled = False
    model(images, mask, targets)
    assert calls.count("cross") == 3


def test_dn_noise_follows_the_generator():
    model = tiny_model()
    model.train()
    images, mask, targets = batch(gt_counts=(3, 2))
    runs = [model(images, mask, targets, generator=torch.Generator().manual_seed(s))["dn_outputs"]["o"][-1]["pred_boxes"]
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("two_stage", [True, False])
def test_float64_model_keeps_float64_dn_box_references(two_stage, monkeypatch):
    """Without noise, a float64 model's DN box logits are inverse_sigmoid of the GT boxes and
    its DN references the GT boxes (centres without two-stage), both to float64 precision."""
    model = tiny_model(two_stage=two_stage, dn_box_noise_scale=0.0, dn_label_noise_ratio=0.0).double().train()
    images, mask, targets = batch(gt_counts=(3, 2))
    targets = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in targets]
    seen = {}
    initial_queries = model.transformer.initial_queries

    def spy(*args):
        seen["dn_box_logits"] = args[-1]
        result = initial_queries(*args)
        seen["reference"] = result[2]
        return result

    monkeypatch.setattr(model.transformer, "initial_queries", spy)
    out = model(images.double(), mask, targets)
    dn_box_logits, reference = seen["dn_box_logits"], seen["reference"]
    assert dn_box_logits.dtype == reference.dtype == out["dn_outputs"]["o"][0]["pred_boxes"].dtype == torch.float64
    S, G = out["dn_meta"]["single_pad"], out["dn_meta"]["num_groups"]
    assert (S, G) == (3, 2)
    coords = 4 if two_stage else 2  # without two-stage a DN query's reference is its box centre
    for b, t in enumerate(targets):
        n = len(t["labels"])
        for k in range(G):
            for slot in (2 * k * S, 2 * k * S + S):  # no noise: positives and negatives are the GT
                torch.testing.assert_close(dn_box_logits[b, slot:slot + n], inverse_sigmoid(t["boxes"]),
                                           rtol=0, atol=1e-12)
                torch.testing.assert_close(reference[b, slot:slot + n, :coords], t["boxes"][:, :coords],
                                           rtol=0, atol=1e-12)
    # a float32 round trip would miss the GT boxes by far more than 1e-12
    assert (inverse_sigmoid(targets[0]["boxes"].float()).double().sigmoid() - targets[0]["boxes"]).abs().max() > 1e-9


def test_clear_errors_on_bad_input():
    model = tiny_model()
    images, mask, targets = batch()
    model.train()
    with pytest.raises(TypeError, match="pixel_mask must be bool"):
        model(images, mask.float(), targets)
    with pytest.raises(ValueError, match="pixel_mask must be"):
        model(images, mask[:, :10], targets)
    with pytest.raises(ValueError, match="needs `targets`"):
        model(images, mask)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        model(images, mask, [{"labels": torch.tensor([7]), "boxes": torch.rand(1, 4)}, targets[1]])
    with pytest.raises(KeyError, match="needs 'labels'"):
        model(images, mask, [{"boxes": torch.rand(1, 4)}, targets[1]])
    with pytest.raises(ValueError, match="num_queries=500"):
        tiny_model(num_queries=500).eval()(images, mask)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_model(hidden_dim=48)
    with pytest.raises(TypeError, match="num_channels"):
        DACDETR(nn.Conv2d(3, 3, 1), num_classes=3)


def test_official_head_init():
    model = tiny_model(num_decoder_layers=2)
    assert len(model.class_embed) == len(model.bbox_embed) == 3  # 2 decoder layers + encoder
    assert model.class_embed[0] is not model.class_embed[1]  # independent copies with box refinement
    prior_bias = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    for cls, box in zip(model.class_embed, model.bbox_embed):
        assert torch.allclose(cls.bias, prior_bias.expand_as(cls.bias))
        assert torch.equal(cls.weight, model.class_embed[0].weight)
        assert torch.count_nonzero(box.layers[-1].weight) == 0 and torch.count_nonzero(box.layers[-1].bias) == 0
    shared = tiny_model(num_decoder_layers=2, two_stage=False, with_box_refine=False)
    assert len(shared.class_embed) == 2 and shared.class_embed[0] is shared.class_embed[1]
    assert torch.equal(shared.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    refine_only = tiny_model(num_decoder_layers=2, two_stage=False)
    assert torch.equal(refine_only.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert torch.count_nonzero(refine_only.bbox_embed[1].layers[-1].bias) == 0


@pytest.mark.parametrize("lft", [True, False])
def test_look_forward_twice_sends_next_layer_box_gradients_into_the_previous_head(lft):
    torch.manual_seed(0)
    model = tiny_model(look_forward_twice=lft, dac_enabled=False, dn_number=0, num_decoder_layers=2)
    randomize_heads(model)
    model.train()
    images, mask, targets = batch()
    out = model(images, mask, targets)
    out["pred_boxes"].sum().backward()  # the layer-1 boxes only
    grad = model.bbox_embed[0].layers[-1].weight.grad
    if lft:
        assert grad is not None and grad.abs().sum() > 0
    else:  # the previous reference is detached: no path to layer 0's head
        assert grad is None or torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("refine", [True, False])
def test_references_move_only_with_box_refinement(refine):
    torch.manual_seed(0)
    model = tiny_model(with_box_refine=refine, num_decoder_layers=3, dn_number=0, dac_enabled=False)
    randomize_heads(model)
    references = []
    for layer in model.transformer.decoder.layers:
        layer.cross_attn.register_forward_hook(lambda mod, args, out: references.append(args[1]))
    model.eval()
    images, mask, _ = batch()
    with torch.no_grad():
        out = model(images, mask)
    assert len(references) == 3
    same = [torch.equal(references[0], r) for r in references[1:]]
    assert not any(same) if refine else all(same)
    if not refine:  # every layer predicts relative to the same (initial) reference
        first = out["aux_outputs"][0]["pred_boxes"]
        assert not torch.equal(first, out["pred_boxes"])


@pytest.mark.gpu
def test_cuda_matches_cpu_and_follows_the_device():
    torch.manual_seed(0)
    cpu_model = tiny_model()
    randomize_heads(cpu_model)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    images, mask, targets = batch(gt_counts=(3, 1))
    cpu_model.eval()
    cuda_model.eval()
    with torch.no_grad():
        expected = cpu_model(images, mask)
        got = cuda_model(images.cuda(), mask.cuda())
    for key in ("pred_logits", "pred_boxes"):
        assert got[key].device.type == "cuda"
        torch.testing.assert_close(got[key].cpu(), expected[key], atol=1e-4, rtol=1e-4)
    cuda_model.train()
    cuda_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    out = cuda_model(images.cuda(), mask.cuda(), cuda_targets, generator=torch.Generator("cuda").manual_seed(0))
    assert out["dn_outputs"]["c"][-1]["pred_boxes"].device.type == "cuda"
    sum(v.sum() for v in _all_tensors(out)).backward()
    assert all(p.grad is not None for p in cuda_model.parameters() if p.requires_grad)


def test_matching_queries_cannot_see_the_denoising_queries():
    """The DN attention mask hides every DN slot (built from GT) from the matching queries: their
    outputs are those of the same model without denoising."""
    torch.manual_seed(0)
    model = tiny_model(dn_number=6)
    randomize_heads(model)
    model.train()
    images, mask, targets = batch(gt_counts=(3, 2))
    with torch.no_grad():
        with_dn = model(images, mask, targets)
        model.dn_number = 0
        without_dn = model(images, mask, targets)
    assert "dn_outputs" in with_dn and "dn_outputs" not in without_dn
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(with_dn[key], without_dn[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(with_dn["c_outputs"][-1][key], without_dn["c_outputs"][-1][key], atol=1e-5, rtol=1e-5)


def test_dropout_runs_the_c_stream_layer0_separately():
    """With dropout the C-stream's layer-0 cross-attention/FFN draw their own dropout masks, as the
    official code, which runs them twice; layer 0 is only identical at dropout 0."""
    torch.manual_seed(0)
    model = tiny_model(dropout=0.3)
    randomize_heads(model)
    model.train()
    images, mask, targets = batch(gt_counts=(3, 2))
    out = model(images, mask, targets)
    assert not torch.equal(out["c_outputs"][0]["pred_logits"], out["aux_outputs"][0]["pred_logits"])
