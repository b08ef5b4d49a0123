"""GPU checks of the Triton kernels at the real DETR shapes (docs/kernels.md, Shapes and minimum
traffic).

Marked ``gpu``: skipped without CUDA (conftest.py). Tolerances: fp32 values -> relative error
(in norm) below 1e-5 against the fp32 grid_sample path; bf16/fp16 values -> compared with an
fp32 oracle fed the upcast inputs, output and grad_value below 2^-7 (one rounding to the
half-precision mantissa), fp32 location and weight gradients below 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from dac_detr.kernels import ms_deform_attn, ms_deform_attn_torch, select_backend

pytestmark = pytest.mark.gpu

ENCODER_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800x1333 padded, S = 22,223
SMALL_SHAPES = [(60, 90), (30, 45), (15, 23), (8, 12)]  # ~480x720, S = 7,191
H, D, P = 8, 32, 4


def level_tensors(shapes, device="cuda"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, sum(h * w for h, w in shapes)


def make_inputs(B, Q, shapes, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    spatial_shapes, level_start_index, S = level_tensors(shapes)
    Q = S if Q is None else Q
    L = len(shapes)
    value = torch.randn(B, S, H, D, device="cuda", generator=g).to(dtype)
    # Reference points inside the image plus offsets of a few pixels, 2 % far outside.
    ref = torch.rand(B, Q, 1, 1, 1, 2, device="cuda", generator=g)
    sizes = torch.tensor([[w, h] for h, w in shapes], device="cuda", dtype=torch.float32).view(1, 1, 1, L, 1, 2)
    offsets = torch.randn(B, Q, H, L, P, 2, device="cuda", generator=g) * 2.0 / sizes
    loc = ref + offsets
    far = torch.rand(B, Q, H, L, P, 1, device="cuda", generator=g) < 0.02
    loc = torch.where(far, loc + 1.5, loc)
    weights = torch.randn(B, Q, H, L * P, device="cuda", generator=g).softmax(-1).view(B, Q, H, L, P)
    return value, spatial_shapes, level_start_index, loc, weights


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def forward_backward(fn, value, spatial_shapes, level_start_index, loc, weights, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    out = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    return out.detach(), torch.autograd.grad(out, inputs, grad_out)


def test_cuda_tensors_use_triton_by_default(monkeypatch):
    monkeypatch.delenv("DAC_DETR_MSDA", raising=False)
    assert select_backend(torch.empty(1, device="cuda"), 4, 4) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("call", ["encoder", "decoder"])
def test_real_shapes_against_fp32_oracle(call, dtype):
    Q = None if call == "encoder" else 1100
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(2, Q, ENCODER_SHAPES, dtype)
    grad_out = torch.randn(2, loc.shape[1], H * D, device="cuda").to(dtype)
    out, grads = forward_backward(ms_deform_attn, value, spatial_shapes, level_start_index, loc, weights, grad_out)
    want_out, want_grads = forward_backward(ms_deform_attn_torch, value.float(), spatial_shapes, level_start_index,
                                            loc, weights, grad_out.float())  # fmt: skip
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    loose = 1e-5 if dtype == torch.float32 else 2**-7
    tight = 1e-5 if dtype == torch.float32 else 1e-4
    assert relative_error(out, want_out) < loose
    assert relative_error(grads[0], want_grads[0]) < loose
    assert relative_error(grads[1], want_grads[1]) < tight
    assert relative_error(grads[2], want_grads[2]) < tight


def test_compile_fullgraph_inductor_and_cuda_graphs():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs(2, 300, SMALL_SHAPES, torch.bfloat16)
    grad_out = torch.randn(2, 300, H * D, device="cuda", dtype=torch.bfloat16)
    want_out, want_grads = forward_backward(ms_deform_attn, value, spatial_shapes, level_start_index, loc, weights,
                                            grad_out)  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(ms_deform_attn, fullgraph=True)
    out, grads = forward_backward(compiled, value, spatial_shapes, level_start_index, loc, weights, grad_out)
    assert relative_error(out, want_out) < 1e-6
    for got, want in zip(grads, want_grads):
        assert relative_error(got, want) < 1e-2  # atomics: summation order differs run to run

    # Capture forward + backward in one CUDA graph: no host sync may happen inside the op.
    static = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            out = ms_deform_attn(static[0], spatial_shapes, level_start_index, static[1], static[2])
            torch.autograd.grad(out, static, grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = ms_deform_attn(static[0], spatial_shapes, level_start_index, static[1], static[2])
        graph_grads = torch.autograd.grad(graph_out, static, grad_out)
    with torch.no_grad():
        static[1].copy_(loc * 0.5 + 0.25)
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_grads = forward_backward(ms_deform_attn_torch, value.float(), spatial_shapes, level_start_index,
                                            loc * 0.5 + 0.25, weights, grad_out.float())  # fmt: skip
    assert relative_error(graph_out, want_out) < 2**-7
    assert relative_error(graph_grads[1], want_grads[1]) < 1e-4
    torch._dynamo.reset()


def test_no_recompilation_when_the_padded_size_changes():
    from dac_detr.kernels import msda_triton

    def step(shapes, Q):
        inputs = make_inputs(2, Q, shapes, torch.bfloat16, seed=Q)
        grad_out = torch.randn(2, inputs[3].shape[1], H * D, device="cuda", dtype=torch.bfloat16)
        forward_backward(ms_deform_attn, *inputs, grad_out)

    step(SMALL_SHAPES, 900)
    compiled = msda_triton.compiled_variant_count()
    assert compiled >= 2
    # Other padded sizes and query counts (divisible by 16 or not, encoder Q = S): same kernels.
    step([(57, 83), (29, 42), (15, 21), (8, 11)], 1100)
    step(ENCODER_SHAPES, None)
    step([(64, 96), (32, 48), (16, 24), (8, 12)], 901)
    assert msda_triton.compiled_variant_count() == compiled


def test_int64_offsets_beyond_two_to_the_31_elements():
    """B*S*H*D > 2^31: the second image's rows lie past int32 range; compare it with a run on that
    image alone."""
    shapes = [(2048, 2050)]
    spatial_shapes, level_start_index, S = level_tensors(shapes)
    assert 2 * S * H * D > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(2, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    loc = torch.rand(2, 64, H, 1, P, 2, device="cuda", generator=g)
    loc[:, :, :, :, 0] = 0.999  # the far end of the map: the largest offsets
    weights = torch.rand(2, 64, H, 1, P, device="cuda", generator=g)
    grad_out = torch.randn(2, 64, H * D, device="cuda", dtype=torch.bfloat16, generator=g)
    out, grads = forward_backward(ms_deform_attn, value, spatial_shapes, level_start_index, loc, weights, grad_out)
    want_out, want_grads = forward_backward(ms_deform_attn, value[1:], spatial_shapes, level_start_index, loc[1:],
                                            weights[1:], grad_out[1:])  # fmt: skip
    assert relative_error(out[1:], want_out) < 1e-6
    assert relative_error(grads[0][1:], want_grads[0]) < 1e-2
    assert relative_error(grads[1][1:], want_grads[1]) < 1e-6
