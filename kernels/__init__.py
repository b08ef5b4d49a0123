"""Multi-scale deformable attention for dac-detr.

``ms_deform_attn`` is the one function the model calls. It is the torch custom op
``torch.ops.dac_detr.ms_deform_attn`` (one node for autograd, ``torch.compile`` and CUDA graphs):
CUDA tensors run the Triton kernels of ``msda_triton``, CPU tensors the pure-PyTorch path of
``msda_torch``; ``DAC_DETR_MSDA={auto,triton,torch}`` overrides the choice (see ``ops``).

The Triton backward accumulates ``grad_value`` with fp32 atomic adds, so its last bits vary from
run to run; under ``torch.use_deterministic_algorithms(True)`` it raises (``warn_only=True``:
warns), like PyTorch's own nondeterministic ops. The CPU path is deterministic.
"""

from __future__ import annotations

from torch import Tensor

from .msda_torch import ms_deform_attn_torch, ms_deform_attn_torch_backward
from .ops import TRITON_IMPORT_ERROR, check_inputs, ms_deform_attn_op, select_backend

__all__ = [
    "TRITON_IMPORT_ERROR",
    "ms_deform_attn",
    "ms_deform_attn_op",
    "ms_deform_attn_torch",
    "ms_deform_attn_torch_backward",
    "select_backend",
]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (the reference Deformable-DETR op's semantics).

    Args:
        value: (B, S, H, D) float32/bfloat16/float16 (float64 too), the flattened levels.
        spatial_shapes: (L, 2) int64 (h, w) per level; keep it on value's device.
        level_start_index: (L,) int64, the exclusive cumulative sum of h*w.
        sampling_locations: (B, Q, H, L, P, 2) in [0, 1] as (x, y), any float dtype (fp32
            recommended; the Triton path never downcasts it).
        attention_weights: (B, Q, H, L, P), any float dtype, softmaxed over L*P by the caller.

    Returns:
        (B, Q, H*D) in value's dtype. Gradients come back in each input's dtype.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
