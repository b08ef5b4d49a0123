"""The detector's parts: sine encodings, MSDeformAttn, CDN queries, proposals, box refinement, configs."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import nn

from dac_detr.boxes import box_cxcywh_to_xyxy, inverse_sigmoid
from dac_detr.models import DACDETR
from dac_detr.models.deformable_attention import MSDeformAttn
from dac_detr.models.denoising import build_cdn_queries
from dac_detr.models.position_encoding import PositionEmbeddingSine, box_sine_embedding
from dac_detr.models.transformer import DeformableTransformer, FlatLevels, refine_boxes


def test_sine_position_embedding_matches_the_formula():
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[0, :, 4:] = True  # last column is padding
    pos = PositionEmbeddingSine(num_pos_feats=4)(mask)
    assert pos.shape == (1, 8, 3, 5)
    i, j = 1, 2
    y = (i + 1 - 0.5) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1 - 0.5) / (4 + 1e-6) * 2 * math.pi
    freqs = [10000 ** (2 * (k // 2) / 4) for k in range(4)]
    expect_y = [math.sin(y / freqs[0]), math.cos(y / freqs[1]), math.sin(y / freqs[2]), math.cos(y / freqs[3])]
    expect_x = [math.sin(x / freqs[0]), math.cos(x / freqs[1]), math.sin(x / freqs[2]), math.cos(x / freqs[3])]
    assert torch.allclose(pos[0, :, i, j], torch.tensor(expect_y + expect_x), atol=1e-6)


def test_box_sine_embedding_layout():
    logits = torch.tensor([[[0.0, 1.0, -1.0, 2.0]]])
    emb = box_sine_embedding(logits, num_pos_feats=4)
    assert emb.shape == (1, 1, 16)
    for c in range(4):  # coordinate order cx, cy, w, h; 4 features each
        v = torch.sigmoid(logits[0, 0, c]).item() * 2 * math.pi
        expect = [math.sin(v), math.cos(v), math.sin(v / 100), math.cos(v / 100)]
        assert torch.allclose(emb[0, 0, 4 * c:4 * c + 4], torch.tensor(expect), atol=1e-6)


def test_msdeformattn_official_init():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head h points along angle 2πh/4, normalised to the unit square, point i scaled by i + 1
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for h in range(4):
        for p in range(3):
            for lvl in range(2):
                assert torch.allclose(bias[h, lvl, p], directions[h] * (p + 1), atol=1e-6)
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_samples_where_the_reference_says(ref_dim):
    """One head, one level, one point with zero offset at a pixel centre reads exactly that pixel;
    an offset moves by pixels (point refs) or by half the box size / n_points (box refs)."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=1).double()
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        attn.value_proj.weight.copy_(torch.eye(8))
        attn.output_proj.weight.copy_(torch.eye(8))
    h, w = 4, 6
    value = torch.randn(1, h * w, 8, dtype=torch.float64)
    shapes = [(h, w)]
    shapes_t = torch.tensor(shapes)
    start = torch.tensor([0])
    query = torch.zeros(1, 1, 8, dtype=torch.float64)
    i, j = 2, 3
    centre = torch.tensor([(j + 0.5) / w, (i + 0.5) / h], dtype=torch.float64)
    ref = centre if ref_dim == 2 else torch.cat([centre, torch.tensor([4.0 / w, 2.0 / h], dtype=torch.float64)])
    out = attn(query, ref.view(1, 1, 1, ref_dim), value, shapes, shapes_t, start)
    assert torch.allclose(out[0, 0], value[0, i * w + j])
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))  # +1 in x
    out = attn(query, ref.view(1, 1, 1, ref_dim), value, shapes, shapes_t, start)
    # points: one pixel right; boxes: offset / n_points * w_box / 2 = 2 pixels right
    step = 1 if ref_dim == 2 else 2
    assert torch.allclose(out[0, 0], value[0, i * w + j + step])
    # padded values are zeroed before sampling
    padding = torch.zeros(1, h * w, dtype=torch.bool)
    padding[0, i * w + j + step] = True
    out = attn(query, ref.view(1, 1, 1, ref_dim), value, shapes, shapes_t, start, padding)
    assert torch.count_nonzero(out) == 0


def _targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        out.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.cat([centre, wh], 1)})
    return out


def test_cdn_layout_noise_and_attention_mask():
    label_enc = nn.Embedding(6, 16)
    targets = _targets([3, 1])
    dn = build_cdn_queries(targets, label_enc, num_classes=5, num_queries=7, dn_number=100,
                           label_noise_ratio=0.0, box_noise_scale=0.4, generator=torch.Generator().manual_seed(0))
    S, G = 3, 100 // 3
    assert (dn.single_pad, dn.num_groups, dn.pad_size) == (S, G, 2 * S * G)
    assert dn.meta() == {"num_groups": G, "single_pad": S, "pad_size": 2 * S * G}
    assert dn.content.shape == (2, dn.pad_size, 16) and dn.box_logits.shape == (2, dn.pad_size, 4)
    for b, t in enumerate(targets):
        gt_xyxy = box_cxcywh_to_xyxy(t["boxes"])
        half = t["boxes"][:, 2:].repeat(1, 2) / 2
        for k in range(G):
            for j in range(S):
                pos, neg = 2 * k * S + j, 2 * k * S + S + j
                if j >= len(t["labels"]):  # padding slots: zero content, box logit 0
                    assert torch.count_nonzero(dn.content[b, pos]) == 0 and torch.count_nonzero(dn.box_logits[b, neg]) == 0
                    continue
                assert torch.equal(dn.content[b, pos], label_enc.weight[t["labels"][j]])  # no label noise here
                for slot, lo, hi in ((pos, 0.0, 0.4), (neg, 0.4, 0.8)):
                    moved = (box_cxcywh_to_xyxy(dn.box_logits[b, slot].sigmoid()) - gt_xyxy[j]).abs() / half[j]
                    assert ((moved >= lo - 1e-3) & (moved <= hi + 1e-3)).all(), (slot, moved)
    m = dn.attn_mask
    P = dn.pad_size
    assert m.shape == (P + 7, P + 7)
    assert m[P:, :P].all() and not m[P:, P:].any()  # matching queries see no DN slot
    assert not m[:P, P:].any()  # DN slots see the matching queries
    assert not m[:2 * S, :2 * S].any() and m[:2 * S, 2 * S:P].all()  # group 0 sees only itself
    assert m[2 * S:4 * S, :2 * S].all() and not m[2 * S:4 * S, 2 * S:4 * S].any()


def test_cdn_label_noise_rate_groups_and_edge_cases():
    label_enc = nn.Embedding(11, 8)
    targets = [{"labels": torch.full((4,), 3), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(4, 1)}]
    dn = build_cdn_queries(targets, label_enc, num_classes=10, num_queries=5, dn_number=2000,
                           label_noise_ratio=0.5, box_noise_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert dn.num_groups == 500
    kept = (dn.content == label_enc.weight[3]).all(-1).float().mean().item()
    # flipped with probability 0.25 to a uniform class (which may be 3 again): keep ≈ 0.75 + 0.025
    assert abs(kept - 0.775) < 0.02
    assert torch.allclose(dn.box_logits.sigmoid(), targets[0]["boxes"][:1].expand(1, dn.pad_size, 4), atol=1e-6)
    assert build_cdn_queries([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                             label_enc, 10, 5, 100, 0.5, 0.4) is None
    assert build_cdn_queries(targets, label_enc, 10, 5, 0, 0.5, 0.4) is None
    over_budget = build_cdn_queries(targets, label_enc, 10, 5, 3, 0.5, 0.4)  # budget 3 < S = 4
    assert (over_budget.num_groups, over_budget.pad_size) == (1, 8)  # one group of 2·S > 2·dn_number slots
    with pytest.raises(ValueError, match="generator is on 'cpu' but the model is on 'meta'"):
        build_cdn_queries(targets, nn.Embedding(11, 8, device="meta"), 10, 5, 100, 0.5, 0.4,
                          generator=torch.Generator())


def test_cdn_boxes_follow_the_parameter_dtype_at_least_float32():
    """A float64 model gets float64 DN box logits, equal to the float64 computation; half
    precision parameters still give float32 boxes."""
    targets = [{"labels": torch.tensor([1, 4]),
                "boxes": torch.tensor([[0.3123456789012345, 0.6, 0.2, 0.1000000123], [0.5, 0.45, 0.3, 0.7]],
                                      dtype=torch.float64)}]
    expected = inverse_sigmoid(targets[0]["boxes"])  # float64 (the boxes are far from 0 and 1: no clamp)
    label_enc = nn.Embedding(6, 8).double()
    dn = build_cdn_queries(targets, label_enc, num_classes=5, num_queries=3, dn_number=4,
                           label_noise_ratio=0.0, box_noise_scale=0.0)
    assert dn.box_logits.dtype == torch.float64 and dn.content.dtype == torch.float64
    S = dn.single_pad
    for k in range(dn.num_groups):
        for slot in (2 * k * S, 2 * k * S + S):  # positives, then negatives (no noise: the GT too)
            torch.testing.assert_close(dn.box_logits[0, slot:slot + 2], expected, rtol=0, atol=1e-12)
    # float32 boxes would be off by far more than 1e-12
    assert (inverse_sigmoid(targets[0]["boxes"].float()).double() - expected).abs().max() > 1e-9
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        low = build_cdn_queries(targets, nn.Embedding(6, 8).to(dtype), 5, 3, 4, 0.0, 0.0)
        assert low.box_logits.dtype == torch.float32
        torch.testing.assert_close(low.box_logits[0, :2], inverse_sigmoid(targets[0]["boxes"].float()),
                                   rtol=0, atol=0)


def test_refine_boxes_with_points_and_boxes():
    delta = torch.tensor([[[0.5, -0.5, 1.0, -1.0]]])
    box = torch.tensor([[[0.4, 0.6, 0.2, 0.3]]])
    logit = torch.log(box / (1 - box))
    assert torch.allclose(refine_boxes(delta, box), (delta + logit).sigmoid(), atol=1e-6)
    point = box[..., :2]
    expect = torch.cat([(delta[..., :2] + logit[..., :2]).sigmoid(), delta[..., 2:].sigmoid()], -1)
    assert torch.allclose(refine_boxes(delta, point), expect, atol=1e-6)


def test_encoder_proposals_and_valid_ratios():
    tr = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                               num_feature_levels=2, enc_n_points=1, dec_n_points=1)
    masks = [torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)]
    masks[0][0, :, 2:] = True  # right half padded
    masks[1][0, :, 1:] = True
    srcs = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)]
    _, _, levels = tr.flatten(srcs, masks, [torch.zeros_like(s) for s in srcs])
    assert isinstance(levels, FlatLevels) and levels.shapes == [(4, 4), (2, 2)]
    assert levels.level_start_index.tolist() == [0, 16]
    assert levels.valid_sizes.tolist() == [[[2, 4], [1, 2]]]  # (w, h) in cells, per level
    assert torch.allclose(levels.valid_ratios, torch.tensor([[[0.5, 1.0], [0.5, 1.0]]]))
    memory = torch.randn(1, 20, 32)
    out_memory, proposals = tr.encoder_proposals(memory, levels)
    boxes = proposals.sigmoid()
    # level 0 token (row 1, col 1): centre ((1 + .5) / 2 valid columns, (1 + .5) / 4 rows), w = h = 0.05
    assert torch.allclose(boxes[0, 5], torch.tensor([0.75, 0.375, 0.05, 0.05]), atol=1e-5)
    assert torch.isinf(proposals[0, 2]).all() and torch.count_nonzero(out_memory[0, 2] - out_memory[0, 3]) == 0
    # level 1, (0, 0): centre (0.5 / 1, 0.5 / 2), w = h = 0.1
    assert torch.allclose(boxes[0, 16], torch.tensor([0.5, 0.25, 0.1, 0.1]), atol=1e-5)
    # x = (j + .5) / 1 valid column = 0.5 -> valid; row 0 of level 0 at x = 0.25 -> valid
    assert torch.isfinite(proposals[0, 0]).all()


class _ConfBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_channels = [8, 16, 24]
        self.strides = [8, 16, 32]
        self.body = nn.ModuleList([nn.Conv2d(3, 8, 3, 8, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 24, 3, 2, 1)])

    def forward(self, images, pixel_mask):
        out, x = [], images
        for conv in self.body:
            x = conv(x)
            out.append((x, torch.nn.functional.interpolate(pixel_mask[None].float(), size=x.shape[-2:]).bool()[0]))
        return out


@pytest.mark.parametrize("dac", ["on", "off"])
def test_hydra_model_configs(dac):
    with initialize_config_module(config_module="dac_detr.conf", version_base="1.3"):
        full = compose(overrides=["+model=dac_detr", f"+dac={dac}"])
        tiny = compose(overrides=["+model=tiny", f"+dac={dac}", "model.dac_enabled=true"])
    model = instantiate(full.model, backbone=_ConfBackbone(), num_classes=91)
    assert isinstance(model, DACDETR)
    assert (model.hidden_dim, model.num_queries, model.num_decoder_layers, model.dn_number) == (256, 900, 6, 100)
    assert (model.dn_box_noise_scale, model.dn_label_noise_ratio, model.dac_enabled) == (0.4, 0.5, dac == "on")
    assert model.two_stage and model.with_box_refine and model.mixed_selection and model.look_forward_twice
    assert model.share_layer0_self_attn
    small = instantiate(tiny.model, backbone=_ConfBackbone(), num_classes=3)
    assert (small.hidden_dim, small.num_queries, small.dac_enabled) == (64, 30, True)
    images = torch.randn(1, 3, 64, 64)
    small.train()
    out = small(images, torch.zeros(1, 64, 64, dtype=torch.bool),
                [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}])
    assert out["pred_logits"].shape == (1, 30, 3) and len(out["c_outputs"]) == 2
