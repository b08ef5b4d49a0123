"""The pure-PyTorch deformable attention (CPU path and test oracle) against a direct per-sample
loop of the reference semantics (docs/kernels.md, Reference semantics), in float64, plus
gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from dac_detr.kernels import ms_deform_attn_torch, ms_deform_attn_torch_backward

SHAPES = [(4, 5), (3, 2), (1, 3)]  # three levels of different sizes, S = 20 + 6 + 3


def level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def ms_deform_attn_loop(value, shapes, sampling_locations, attention_weights):
    """One sample at a time, exactly as the reference CUDA kernel reads: window test, then four
    corners each read only when on the map. Built from differentiable scalar ops."""
    B, _, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = [[None] * Q for _ in range(B)]
    for b in range(B):
        for q in range(Q):
            heads = []
            for head in range(H):
                acc = value.new_zeros(D)
                for lvl, (h_l, w_l) in enumerate(shapes):
                    for p in range(P):
                        x, y = sampling_locations[b, q, head, lvl, p]
                        w_im = x * w_l - 0.5
                        h_im = y * h_l - 0.5
                        if not (h_im > -1 and w_im > -1 and h_im < h_l and w_im < w_l):
                            continue
                        x0 = math.floor(w_im.item())
                        y0 = math.floor(h_im.item())
                        lw = w_im - x0
                        lh = h_im - y0
                        sample = value.new_zeros(D)
                        for yc, xc, weight in (
                            (y0, x0, (1 - lh) * (1 - lw)),
                            (y0, x0 + 1, (1 - lh) * lw),
                            (y0 + 1, x0, lh * (1 - lw)),
                            (y0 + 1, x0 + 1, lh * lw),
                        ):
                            if 0 <= yc < h_l and 0 <= xc < w_l:
                                sample = sample + weight * value[b, starts[lvl] + yc * w_l + xc, head]
                        acc = acc + attention_weights[b, q, head, lvl, p] * sample
                heads.append(acc)
            out[b][q] = torch.cat(heads)
    return torch.stack([torch.stack(row) for row in out])


def edge_locations(B, Q, H, L, P, generator):
    """Locations covering the interior, the exact map border (0 and 1), partially outside
    (one or two corners on the map) and fully outside; avoids the measure-zero kink h_im = -1."""
    special = torch.tensor([0.0, 1.0, -0.05, 1.04, -0.4, 1.6, 0.5, 3.0, -2.0], dtype=torch.float64)
    loc = torch.rand(B, Q, H, L, P, 2, generator=generator, dtype=torch.float64) * 1.3 - 0.15
    flat = loc.view(-1, 2)
    picks = torch.randint(0, len(special), (flat.shape[0] // 2, 2), generator=generator)
    flat[: picks.shape[0]] = special[picks]
    return loc


def make_inputs(B=2, Q=5, H=2, D=3, P=2, shapes=SHAPES, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, S = level_tensors(shapes)
    L = len(shapes)
    value = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    loc = edge_locations(B, Q, H, L, P, g).to(dtype)
    weights = torch.rand(B, Q, H, L * P, generator=g, dtype=dtype).softmax(-1).view(B, Q, H, L, P)
    return value, spatial_shapes, level_start_index, loc, weights


def test_torch_path_matches_per_sample_loop_float64():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs()
    for t in (value, loc, weights):
        t.requires_grad_(True)
    out = ms_deform_attn_torch(value, spatial_shapes, level_start_index, loc, weights)
    ref = ms_deform_attn_loop(value, SHAPES, loc, weights)
    assert out.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # Gradients through autograd of both formulations agree too (the special locations sit on
    # cell edges where both take the right derivative, as floor() does).
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_out)
    ref_grads = torch.autograd.grad(ref, (value, loc, weights), grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_samples_outside_the_window_contribute_nothing():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B=1, Q=3, H=1, D=2, P=1)
    loc[:] = torch.tensor([-0.5, 2.0], dtype=torch.float64)  # far outside every level
    out = ms_deform_attn_torch(value, spatial_shapes, level_start_index, loc, weights)
    assert torch.count_nonzero(out) == 0
    # Exactly on the left border of the 4x5 level (x = 0 -> w_im = -0.5) on the centre of row 0
    # (y = 0.125 -> h_im = 0): only the on-map corner (0, 0) is read, with bilinear weight 0.5.
    loc = loc[:, :, :, :1].clone()
    loc[..., 0] = 0.0
    loc[..., 1] = 0.125
    one_level = ms_deform_attn_torch(value[:, :20], spatial_shapes[:1], level_start_index[:1], loc,
                                     torch.ones_like(weights[:, :, :, :1]))  # fmt: skip
    torch.testing.assert_close(one_level[0, 0], 0.5 * value[0, 0, 0], atol=1e-12, rtol=1e-12)


def test_gradcheck_small_float64():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B=1, Q=3, H=2, D=2, P=2, seed=1)
    # Generic positions (no cell edges, no window edges): the function is smooth there.
    g = torch.Generator().manual_seed(3)
    loc = (torch.rand(loc.shape, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(True)
    value.requires_grad_(True)
    weights.requires_grad_(True)

    def fn(v, sl, aw):
        return ms_deform_attn_torch(v, spatial_shapes, level_start_index, sl, aw)

    assert torch.autograd.gradcheck(fn, (value, loc, weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_explicit_backward_matches_autograd(dtype):
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B=2, Q=6, H=2, D=5, P=3, dtype=dtype)
    for t in (value, loc, weights):
        t.requires_grad_(True)
    out = ms_deform_attn_torch(value, spatial_shapes, level_start_index, loc, weights)
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(out, (value, loc, weights), grad_out)
    got = ms_deform_attn_torch_backward(grad_out, value.detach(), spatial_shapes, level_start_index,
                                        loc.detach(), weights.detach())  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_mismatched_level_table_is_a_clear_error():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B=1, Q=2)
    with pytest.raises(ValueError, match="sum\\(h\\*w\\)"):
        ms_deform_attn_torch(value[:, :-1], spatial_shapes, level_start_index, loc, weights)
