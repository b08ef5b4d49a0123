"""Pure-PyTorch multi-scale deformable attention: the CPU path and the test oracle.

Bilinear sampling with zero padding and ``align_corners=False`` through ``F.grid_sample``, the
exact semantics of the reference Deformable-DETR op (shared/KERNELS.md §1.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_torch(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """value (B, S, H, D), sampling_locations (B, Q, H, L, P, 2) in [0, 1] as (x, y),
    attention_weights (B, Q, H, L, P) -> (B, Q, H*D)."""
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # Python ints: iterating over a CUDA tensor would sync once per level.
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else list(spatial_shapes)
    sizes = [int(h) * int(w) for h, w in shapes]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, H, D) -> (B*H, D, h, w)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, int(h), int(w))
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1).to(v.dtype)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*H, D, Q, L, P) weighted by (B*H, 1, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L, P).to(value.dtype)
    out = (torch.stack(sampled, dim=-2) * weights).sum((-1, -2))
    return out.view(B, H * D, Q).transpose(1, 2).contiguous()
