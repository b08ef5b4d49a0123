"""The Triton forward and backward kernels against the pure-PyTorch path.

Without CUDA, conftest.py sets TRITON_INTERPRET=1 before the kernels are imported, so they run in
the Triton interpreter on CPU tensors (one program at a time: the grids here stay at tens of
programs). With CUDA the same tests run the compiled kernels.

Tolerances: fp32 inputs -> output and all three gradients within atol = rtol = 1e-5 of the fp32
grid_sample path (only the summation order differs); fp64 -> 1e-12; bf16/fp16 values -> compared
with an fp32 oracle run on the upcast inputs, relative error (in norm) below 2^-7 for the outputs
and grad_value (one rounding to the 8-bit bf16 mantissa) and 1e-5 for the fp32 location and
weight gradients (computed in fp32 from the same upcast numbers).
"""

from __future__ import annotations

import pytest
import torch

from dac_detr.kernels import ms_deform_attn_torch

msda_triton = pytest.importorskip("dac_detr.kernels.msda_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not msda_triton.INTERPRETED:
    pytest.skip("CPU run without TRITON_INTERPRET=1 at import: the kernels cannot run", allow_module_level=True)


def level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


# Values that land exactly on the map border (0, 1), partly outside (one or two corners on the
# map), fully outside (skipped) and far outside; none sits on the h_im = -1 kink of grid_sample.
SPECIAL = [0.0, 1.0, -0.04, 1.03, -0.45, 1.7, 0.5, 4.0, -3.0]


def make_inputs(B, Q, H, D, P, shapes, seed=0, dtype=torch.float32, special_fraction=0.4):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, S = level_tensors(shapes)
    L = len(shapes)
    value = torch.randn(B, S, H, D, generator=g)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.3 - 0.15
    flat = loc.view(-1)
    n_special = int(flat.numel() * special_fraction)
    idx = torch.randperm(flat.numel(), generator=g)[:n_special]
    flat[idx] = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (n_special,), generator=g)]
    weights = torch.rand(B, Q, H, L * P, generator=g).softmax(-1).view(B, Q, H, L, P)
    to = dict(device=DEVICE, dtype=dtype)
    return (value.to(**to), spatial_shapes.to(DEVICE), level_start_index.to(DEVICE), loc.to(**to), weights.to(**to))


def run_triton(value, spatial_shapes, level_start_index, loc, weights, grad_out):
    meta = msda_triton.level_metadata(spatial_shapes, level_start_index, value.device)
    out = msda_triton.ms_deform_attn_triton_forward(value, meta, loc, weights)
    grads = msda_triton.ms_deform_attn_triton_backward(grad_out, value, meta, loc, weights)
    return out, grads


def run_oracle(value, spatial_shapes, level_start_index, loc, weights, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn_torch(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads


CASES = {
    # name: (B, Q, H, D, P, level shapes)
    "three_levels_edges": (2, 13, 2, 8, 2, [(4, 5), (3, 2), (1, 3)]),
    "non_pow2_head_dim": (2, 7, 2, 6, 3, [(5, 3), (2, 2)]),
    "head_dim_3_single_level": (1, 9, 3, 3, 4, [(6, 7)]),
    "two_query_blocks": (1, 70, 1, 4, 1, [(3, 4), (2, 2)]),
    "five_levels_eight_points": (1, 4, 1, 2, 8, [(5, 6), (3, 3), (2, 2), (1, 2), (1, 1)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_torch_path_fp32(case):
    B, Q, H, D, P, shapes = CASES[case]
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B, Q, H, D, P, shapes)
    grad_out = torch.randn(B, Q, H * D, device=DEVICE, generator=None)
    out, grads = run_triton(value, spatial_shapes, level_start_index, loc, weights, grad_out)
    want_out, want_grads = run_oracle(value, spatial_shapes, level_start_index, loc, weights, grad_out)
    assert out.shape == (B, Q, H * D) and out.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("grad_value", "grad_loc", "grad_attn"), grads, want_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The cases do exercise every regime: some samples skipped, some on the map.
    assert torch.count_nonzero(grads[2]) < grads[2].numel()
    assert torch.count_nonzero(grads[2]) > 0


def test_padded_batch_matches_torch_path():
    """Two images padded to one size: the smaller image's padded positions hold zeros in value
    (as the encoder's masked_fill leaves them) and its queries sample inside its valid region."""
    B, Q, H, D, P = 2, 10, 2, 4, 2
    shapes = [(6, 8), (3, 4)]
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B, Q, H, D, P, shapes, seed=5)
    valid_hw = [(4, 5), (2, 3)]  # image 1's un-padded part of each level
    padded = torch.zeros(value.shape[1], dtype=torch.bool, device=DEVICE)
    start = 0
    for (h, w), (vh, vw) in zip(shapes, valid_hw):
        level = torch.ones(h, w, dtype=torch.bool, device=DEVICE)
        level[:vh, :vw] = False
        padded[start : start + h * w] = level.flatten()
        start += h * w
    value[1, padded] = 0.0
    loc[1] = loc[1] * 0.6  # mostly inside the valid part, a few samples still reach the padding
    grad_out = torch.randn(B, Q, H * D, device=DEVICE)
    out, grads = run_triton(value, spatial_shapes, level_start_index, loc, weights, grad_out)
    want_out, want_grads = run_oracle(value, spatial_shapes, level_start_index, loc, weights, grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_float64_matches_torch_path_tightly():
    B, Q, H, D, P, shapes = CASES["three_levels_edges"]
    inputs = make_inputs(B, Q, H, D, P, shapes, seed=2, dtype=torch.float64)
    grad_out = torch.randn(B, Q, H * D, device=DEVICE, dtype=torch.float64)
    out, grads = run_triton(*inputs, grad_out)
    want_out, want_grads = run_oracle(*inputs, grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_gradcheck_through_the_kernels_float64():
    value, spatial_shapes, level_start_index, _, weights = make_inputs(1, 2, 1, 2, 1, [(3, 4), (2, 2)], seed=7,
                                                                       dtype=torch.float64)  # fmt: skip
    g = torch.Generator().manual_seed(11)  # generic positions: away from cell and window edges
    loc = (torch.rand(1, 2, 1, 2, 1, 2, generator=g, dtype=torch.float64) * 1.1 - 0.05).to(DEVICE)
    meta = msda_triton.level_metadata(spatial_shapes, level_start_index, value.device)

    class TritonMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v, sl, aw):
            ctx.save_for_backward(v, sl, aw)
            return msda_triton.ms_deform_attn_triton_forward(v, meta, sl, aw)

        @staticmethod
        def backward(ctx, grad_out):
            return msda_triton.ms_deform_attn_triton_backward(grad_out, *ctx.saved_tensors[:1], meta,
                                                               *ctx.saved_tensors[1:])  # fmt: skip

    args = tuple(t.requires_grad_(True) for t in (value, loc, weights))
    assert torch.autograd.gradcheck(TritonMSDA.apply, args, eps=1e-6, atol=1e-7)


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_values_fp32_locations_against_fp32_oracle(dtype):
    B, Q, H, D, P, shapes = CASES["three_levels_edges"]
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B, Q, H, D, P, shapes, seed=3)
    value = value.to(dtype)
    grad_out = torch.randn(B, Q, H * D, device=DEVICE).to(dtype)
    out, (grad_value, grad_loc, grad_attn) = run_triton(value, spatial_shapes, level_start_index, loc, weights,
                                                        grad_out)  # fmt: skip
    # Gradients come back in each input's dtype: the value's half type, fp32 for the rest.
    assert out.dtype == dtype and grad_value.dtype == dtype
    assert grad_loc.dtype == torch.float32 and grad_attn.dtype == torch.float32
    want_out, (want_value, want_loc, want_attn) = run_oracle(value.float(), spatial_shapes, level_start_index, loc,
                                                             weights, grad_out.float())  # fmt: skip
    assert relative_error(out, want_out) < 2**-7
    assert relative_error(grad_value, want_value) < 2**-7
    assert relative_error(grad_loc, want_loc) < 1e-5
    assert relative_error(grad_attn, want_attn) < 1e-5


def test_locations_are_never_downcast():
    """fp64 locations with an fp32 value: the location gradient stays fp64, and a location
    difference far below fp32/bf16 resolution still moves the output."""
    B, Q, H, D, P, shapes = 1, 2, 1, 4, 1, [(64, 64)]
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(B, Q, H, D, P, shapes, seed=4,
                                                                         special_fraction=0.0)  # fmt: skip
    loc = loc.double().clamp(0.1, 0.9)
    grad_out = torch.ones(B, Q, H * D, device=DEVICE)
    out, (_, grad_loc, grad_attn) = run_triton(value, spatial_shapes, level_start_index, loc, weights, grad_out)
    assert grad_loc.dtype == torch.float64 and grad_attn.dtype == torch.float32
    # A shift of 1e-4 px is lost in a bf16 location (spacing ~4e-3 near 1) but kept here.
    shifted, _ = run_triton(value, spatial_shapes, level_start_index, loc + 1e-4 / 64, weights, grad_out)
    assert not torch.equal(out, shifted)


def test_empty_query_set():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(2, 0, 2, 4, 2, [(3, 3)])
    grad_out = torch.zeros(2, 0, 8, device=DEVICE)
    out, (grad_value, grad_loc, grad_attn) = run_triton(value, spatial_shapes, level_start_index, loc, weights,
                                                        grad_out)  # fmt: skip
    assert out.shape == (2, 0, 8) and grad_loc.shape == loc.shape and grad_attn.shape == weights.shape
    assert torch.count_nonzero(grad_value) == 0
