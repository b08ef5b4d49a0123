"""``dac_detr.kernels.ms_deform_attn`` as a torch custom op: autograd, opcheck, one node under
torch.compile(fullgraph=True), backend choice through DAC_DETR_MSDA, determinism, input errors."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from dac_detr.kernels import ms_deform_attn, ms_deform_attn_torch
from dac_detr.kernels import ops

SHAPES = [(4, 5), (2, 3)]


def make_inputs(B=2, Q=6, H=2, D=4, P=2, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(SHAPES)
    level_start_index = torch.tensor([0, 20])
    L = len(SHAPES)
    value = torch.randn(B, 26, H, D, generator=g)
    loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(B, Q, H, L * P, generator=g).softmax(-1).view(B, Q, H, L, P)
    if requires_grad:
        for t in (value, loc, weights):
            t.requires_grad_(True)
    return value, spatial_shapes, level_start_index, loc, weights


def grads_of(fn, inputs, grad_out):
    value, spatial_shapes, level_start_index, loc, weights = inputs
    out = fn(value, spatial_shapes, level_start_index, loc, weights)
    return out, torch.autograd.grad(out, (value, loc, weights), grad_out)


def triton_available_on_cpu():
    return ops.msda_triton is not None and ops.msda_triton.INTERPRETED


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_op_autograd_matches_autograd_of_torch_path(backend, monkeypatch):
    if backend == "triton" and not triton_available_on_cpu():
        pytest.skip("the Triton interpreter was not switched on at import")
    monkeypatch.setenv("DAC_DETR_MSDA", backend)
    inputs = make_inputs()
    grad_out = torch.randn(2, 6, 8)
    out, grads = grads_of(ms_deform_attn, inputs, grad_out)
    want_out, want_grads = grads_of(ms_deform_attn_torch, inputs, grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_opcheck_schema_fake_and_autograd_registration():
    inputs = make_inputs(B=1, Q=3, H=1, D=2, P=1)
    result = torch.library.opcheck(torch.ops.dac_detr.ms_deform_attn.default, inputs)
    assert set(result.values()) == {"SUCCESS"}, result


def test_compile_fullgraph_sees_one_op_each_way():
    """Dynamo captures the call without a graph break, and AOTAutograd puts exactly one forward
    op in the forward graph and one backward op in the backward graph (the cheap aot_autograd
    backend: no Inductor code generation on CPU)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    compiled = torch.compile(ms_deform_attn, fullgraph=True, backend=backend)
    inputs = make_inputs()
    grad_out = torch.randn(2, 6, 8)
    out, grads = grads_of(compiled, inputs, grad_out)
    want_out, want_grads = grads_of(ms_deform_attn_torch, inputs, grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert graphs["forward"].count("dac_detr.ms_deform_attn.default") == 1
    assert not any("grid_sampler" in target for target in graphs["forward"] + graphs["backward"])
    assert graphs["backward"].count("dac_detr.ms_deform_attn_backward.default") == 1
    torch._dynamo.reset()


def test_compile_dynamic_shapes_follow_a_new_padded_size():
    """With dynamic shapes, a new padded image size (other S, Q and level sizes) reuses the
    symbolic graph: the fake implementation must handle symbolic sizes."""
    torch._dynamo.reset()
    compiled = torch.compile(ms_deform_attn, fullgraph=True, dynamic=True, backend="aot_eager")
    for shapes, Q in (([(4, 5), (2, 3)], 6), ([(6, 7), (3, 4)], 11)):
        g = torch.Generator().manual_seed(Q)
        S = sum(h * w for h, w in shapes)
        value = torch.randn(2, S, 2, 4, generator=g, requires_grad=True)
        loc = torch.rand(2, Q, 2, 2, 2, 2, generator=g, requires_grad=True)
        weights = torch.rand(2, Q, 2, 2, 2, generator=g, requires_grad=True)
        spatial_shapes = torch.tensor(shapes)
        level_start_index = torch.tensor([0, shapes[0][0] * shapes[0][1]])
        inputs = (value, spatial_shapes, level_start_index, loc, weights)
        grad_out = torch.randn(2, Q, 8, generator=g)
        out, grads = grads_of(compiled, inputs, grad_out)
        want_out, want_grads = grads_of(ms_deform_attn_torch, inputs, grad_out)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_only_requested_gradients_are_returned():
    value, spatial_shapes, level_start_index, loc, weights = make_inputs()
    value.requires_grad_(False)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)
    out.sum().backward()
    assert value.grad is None and loc.grad is not None and weights.grad is not None


def test_unknown_backend_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DAC_DETR_MSDA", "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        ms_deform_attn(*make_inputs(requires_grad=False))


def test_deterministic_mode_raises_or_warns_for_the_atomic_backward(monkeypatch):
    if not triton_available_on_cpu():
        pytest.skip("the Triton interpreter was not switched on at import")
    monkeypatch.setenv("DAC_DETR_MSDA", "triton")
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = ms_deform_attn(*make_inputs())
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        out = ms_deform_attn(*make_inputs())
        with pytest.warns(UserWarning, match="atomic adds"):
            out.sum().backward()
        # The CPU path has a deterministic backward: no alert.
        monkeypatch.setenv("DAC_DETR_MSDA", "torch")
        torch.use_deterministic_algorithms(True)
        out = ms_deform_attn(*make_inputs())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0][:, :, 0]), "value must be \\(B, S, H, D\\)"),
        (lambda a: a.__setitem__(3, a[3][..., 0]), "sampling_locations must be \\(B, Q, H, L, P, 2\\)"),
        (lambda a: a.__setitem__(4, a[4][..., :1]), "attention_weights must be \\(B, Q, H, L, P\\)"),
        (lambda a: a.__setitem__(1, a[1][:1]), "spatial_shapes must be \\(L, 2\\)"),
        (lambda a: a.__setitem__(1, a[1].float()), "integer tensors"),
        (lambda a: a.__setitem__(2, torch.tensor([0, 19])), "exclusive cumulative sum"),
        (lambda a: a.__setitem__(0, a[0][:, :-1]), "sum\\(h\\*w\\)"),
        (lambda a: a.__setitem__(3, a[3][:1]), "must share batch"),
    ],
)
def test_bad_inputs_name_the_problem(mutate, message):
    args = list(make_inputs(requires_grad=False))
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*args)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from dac_detr.kernels import ms_deform_attn\n"
        "v = torch.randn(1, 4, 1, 2); loc = torch.rand(1, 3, 1, 1, 1, 2); w = torch.ones(1, 3, 1, 1, 1)\n"
        "ms_deform_attn(v, torch.tensor([[2, 2]]), torch.tensor([0]), loc, w)\n"
    )
    result = run_python(code, TRITON_INTERPRET="0", DAC_DETR_MSDA="triton")
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr and "before importing dac_detr.kernels" in result.stderr


def test_without_triton_the_torch_path_runs_and_cuda_calls_warn():
    code = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None  # make `import triton` fail\n"
        "import torch\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "from dac_detr.kernels import ms_deform_attn, select_backend, TRITON_IMPORT_ERROR\n"
        "assert TRITON_IMPORT_ERROR is not None\n"
        "v = torch.randn(1, 4, 1, 2); loc = torch.rand(1, 3, 1, 1, 1, 2); w = torch.ones(1, 3, 1, 1, 1)\n"
        "out = ms_deform_attn(v, torch.tensor([[2, 2]]), torch.tensor([0]), loc, w)\n"
        "assert out.shape == (1, 3, 2)\n"
        "with FakeTensorMode():\n"
        "    fake_cuda_value = torch.empty(1, 4, 1, 2, device='cuda')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert select_backend(fake_cuda_value, 4, 4) == 'torch'\n"
        "assert any('grid_sample path' in str(w.message) for w in caught), caught\n"
        "import os; os.environ['DAC_DETR_MSDA'] = 'triton'\n"
        "try:\n"
        "    ms_deform_attn(v, torch.tensor([[2, 2]]), torch.tensor([0]), loc, w)\n"
        "except RuntimeError as error:\n"
        "    assert 'install triton' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    result = run_python(code, DAC_DETR_MSDA="auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_model_attention_module_gives_the_same_result_on_both_backends(monkeypatch):
    """The detector's MSDeformAttn (its own location/weight layout, padding mask, box references)
    through the interpreted kernels and through grid_sample."""
    if not triton_available_on_cpu():
        pytest.skip("the Triton interpreter was not switched on at import")
    from dac_detr.models.deformable_attention import MSDeformAttn

    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)  # move off the init rings
    torch.nn.init.normal_(module.attention_weights.weight, std=0.5)
    shapes = [(4, 5), (2, 3)]
    spatial_shapes = torch.tensor(shapes)
    level_start_index = torch.tensor([0, 20])
    query = torch.randn(2, 7, 16)
    value_input = torch.randn(2, 26, 16)
    padding_mask = torch.zeros(2, 26, dtype=torch.bool)
    padding_mask[1, 15:20] = True
    results = {}
    for backend, reference in (("torch", torch.rand(2, 7, 2, 4)), ("triton", None)):
        reference = reference if reference is not None else results["torch"][0]
        monkeypatch.setenv("DAC_DETR_MSDA", backend)
        module.zero_grad()
        out = module(query, reference, value_input, shapes, spatial_shapes, level_start_index, padding_mask)
        out.square().sum().backward()
        results[backend] = (reference, out.detach(), [p.grad.clone() for p in module.parameters()])
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=1e-5, rtol=1e-5)
    for got, want in zip(results["triton"][2], results["torch"][2]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
