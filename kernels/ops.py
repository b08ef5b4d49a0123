"""``dac_detr::ms_deform_attn`` as a torch custom op: one node for autograd, torch.compile and
CUDA graphs, with the Triton kernels for CUDA tensors and the pure-PyTorch path for CPU tensors.

Backend choice (per call, inside the op, so a compiled graph keeps one node either way):

==================  =====================================================================
``DAC_DETR_MSDA``   behaviour
==================  =====================================================================
``auto`` (default)  CUDA tensors -> Triton; CPU tensors -> pure PyTorch. Falls back to pure
                    PyTorch with a warning when triton does not import, or when L > 5 or
                    P > 8 (the limits the kernels are unrolled for).
``torch``           pure PyTorch (``F.grid_sample``) everywhere.
``triton``          Triton everywhere; on CPU tensors the kernels run in the Triton
                    interpreter, which needs ``TRITON_INTERPRET=1`` in the environment
                    *before* ``dac_detr.kernels`` is imported.
==================  =====================================================================

Determinism: the Triton backward accumulates ``grad_value`` with atomic adds, so its last bits
vary from run to run (so does ``grid_sample``'s CUDA backward). Under
``torch.use_deterministic_algorithms(True)`` the Triton backward raises, and with
``warn_only=True`` it warns, exactly as PyTorch's own nondeterministic ops do. The CPU path is
deterministic.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from .msda_torch import ms_deform_attn_torch, ms_deform_attn_torch_backward

try:
    from . import msda_triton

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as error:  # triton missing or broken: the pure-PyTorch path still works
    msda_triton = None
    TRITON_IMPORT_ERROR = error

MAX_LEVELS = 5
MAX_POINTS = 8
BACKEND_ENV = "DAC_DETR_MSDA"
_BACKENDS = ("auto", "triton", "torch")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested_backend() -> str:
    """The value of ``DAC_DETR_MSDA`` (default ``auto``), validated."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not a known backend; use one of {', '.join(_BACKENDS)}")
    return choice


def select_backend(value: Tensor, num_levels: int, num_points: int) -> str:
    """'triton' or 'torch' for a call on ``value``'s device (see the module docstring)."""
    choice = requested_backend()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if msda_triton is None:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but triton failed to import ({TRITON_IMPORT_ERROR!r}); "
                f"install triton>=3.2 or set {BACKEND_ENV}=torch"
            )
        if value.device.type == "cpu" and not msda_triton.INTERPRETED:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton on CPU tensors runs the kernels in the Triton interpreter, which "
                "must be switched on before the kernels are defined: set TRITON_INTERPRET=1 in the "
                f"environment before importing dac_detr.kernels (or use {BACKEND_ENV}=torch on CPU)"
            )
        if num_levels > MAX_LEVELS or num_points > MAX_POINTS:
            raise ValueError(
                f"the Triton kernels support at most {MAX_LEVELS} levels and {MAX_POINTS} points, got "
                f"L={num_levels}, P={num_points}; use {BACKEND_ENV}=torch (or auto) for larger settings"
            )
        return "triton"
    # auto
    if value.device.type != "cuda":
        return "torch"
    if msda_triton is None:
        _warn_once(
            "no-triton",
            f"triton failed to import ({TRITON_IMPORT_ERROR!r}); multi-scale deformable attention falls "
            "back to the slower, memory-hungry grid_sample path. Install triton>=3.2 to use the kernels.",
        )
        return "torch"
    if num_levels > MAX_LEVELS or num_points > MAX_POINTS:
        _warn_once(
            f"limits-{num_levels}-{num_points}",
            f"L={num_levels}, P={num_points} exceed the Triton kernels' limits (L<={MAX_LEVELS}, "
            f"P<={MAX_POINTS}); using the grid_sample path",
        )
        return "torch"
    return "triton"


def _check_levels_on_host(spatial_shapes: Tensor, level_start_index: Tensor, num_keys: int) -> None:
    """Data checks that need the level table's values; only done for CPU tensors (no sync)."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    expected, total = [], 0
    for h, w in shapes:
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes must hold positive (h, w) per level, got {shapes}")
        expected.append(total)
        total += h * w
    if total != num_keys:
        raise ValueError(
            f"spatial_shapes {shapes} cover {total} positions but value has S={num_keys}; sum(h*w) "
            "over the levels must equal S"
        )
    if starts != expected:
        raise ValueError(
            f"level_start_index {starts} does not match spatial_shapes {shapes}; it must be the "
            f"exclusive cumulative sum of h*w, i.e. {expected}"
        )


def _alert_not_deterministic() -> None:
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "dac_detr ms_deform_attn backward (Triton) accumulates grad_value with atomic adds and has "
        "no deterministic implementation. Call torch.use_deterministic_algorithms(True, "
        "warn_only=True) to allow it with a warning (the CUDA grid_sample backward is "
        "nondeterministic as well), or run on CPU, whose path is deterministic."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=2)
    else:
        raise RuntimeError(message)


@torch.library.custom_op("dac_detr::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """value (B, S, H, D); spatial_shapes (L, 2) (h, w); level_start_index (L,);
    sampling_locations (B, Q, H, L, P, 2); attention_weights (B, Q, H, L, P) -> (B, Q, H*D)."""
    _, _, _, num_levels, num_points, _ = sampling_locations.shape
    backend = select_backend(value, num_levels, num_points)
    if value.device.type == "cpu":
        _check_levels_on_host(spatial_shapes, level_start_index, value.shape[1])
    if backend == "triton":
        level_meta = msda_triton.level_metadata(spatial_shapes, level_start_index, value.device)
        return msda_triton.ms_deform_attn_triton_forward(value, level_meta, sampling_locations, attention_weights)
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, H, D = value.shape
    return value.new_empty((B, sampling_locations.shape[1], H * D))


@torch.library.custom_op("dac_detr::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_output (B, Q, H*D) -> (grad_value, grad_sampling_locations, grad_attention_weights),
    each in its input's dtype."""
    _, _, _, num_levels, num_points, _ = sampling_locations.shape
    backend = select_backend(value, num_levels, num_points)
    if backend == "triton":
        _alert_not_deterministic()
        level_meta = msda_triton.level_metadata(spatial_shapes, level_start_index, value.device)
        return msda_triton.ms_deform_attn_triton_backward(
            grad_output, value, level_meta, sampling_locations, attention_weights
        )
    return ms_deform_attn_torch_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_loc if needs[3] else None,
        grad_attn if needs[4] else None,
    )


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def _fail(problem: str) -> None:
    raise ValueError(f"ms_deform_attn: {problem}")


def check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    """Shape, dtype and device checks that need no tensor values (so no host sync, and nothing
    data-dependent under torch.compile). Raises ValueError naming the problem and the fix."""
    for name, tensor in (
        ("value", value),
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(tensor, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        _fail(f"value must be (B, S, H, D), got shape {tuple(value.shape)}; reshape it to (B, S, heads, head_dim)")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        _fail(
            f"sampling_locations must be (B, Q, H, L, P, 2) with (x, y) last, got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    B, _, H, _ = value.shape
    _, _, _, L, _, _ = sampling_locations.shape
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != H:
        _fail(
            f"sampling_locations {tuple(sampling_locations.shape)} must share batch B={B} and heads H={H} "
            f"with value {tuple(value.shape)}"
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:5]):
        _fail(
            f"attention_weights must be (B, Q, H, L, P) = {tuple(sampling_locations.shape[:5])} to match "
            f"sampling_locations, got {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (L, 2):
        _fail(
            f"spatial_shapes must be (L, 2) = ({L}, 2) (one (h, w) row per level of sampling_locations), "
            f"got {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (L,):
        _fail(f"level_start_index must be (L,) = ({L},), got {tuple(level_start_index.shape)}")
    if spatial_shapes.dtype.is_floating_point or level_start_index.dtype.is_floating_point:
        _fail("spatial_shapes and level_start_index must be integer tensors (int64 or int32)")
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):  # fmt: skip
        if not tensor.dtype.is_floating_point:
            _fail(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if sampling_locations.device != value.device or attention_weights.device != value.device:
        _fail(
            f"value ({value.device}), sampling_locations ({sampling_locations.device}) and attention_weights "
            f"({attention_weights.device}) must be on the same device"
        )
