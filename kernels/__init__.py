"""Multi-scale deformable attention for dac-detr.

``ms_deform_attn`` is the one function the model calls. CPU tensors use the pure-PyTorch path in
``msda_torch``; the Triton kernels for CUDA tensors plug in behind the same function.
"""

from __future__ import annotations

from torch import Tensor

from .msda_torch import ms_deform_attn_torch

__all__ = ["ms_deform_attn", "ms_deform_attn_torch"]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """value (B, S, H, D); spatial_shapes (L, 2) int64 (h, w); level_start_index (L,);
    sampling_locations (B, Q, H, L, P, 2) in [0, 1] (x, y); attention_weights (B, Q, H, L, P)
    -> (B, Q, H*D)."""
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
