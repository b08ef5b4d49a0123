"""Pure-PyTorch multi-scale deformable attention: the CPU path and the test oracle.

Bilinear sampling with zero padding and ``align_corners=False`` through ``F.grid_sample``, the
exact semantics of the reference Deformable-DETR op (docs/kernels.md, Reference semantics), up to
one measure-zero difference: a sample exactly at ``h_im == -1`` (or ``w_im == -1``) is skipped by
the reference (zero gradient) while ``grid_sample`` gives it a location gradient from its one on-map
corner (its value is 0 either way).

``ms_deform_attn_torch`` is differentiable through autograd. ``ms_deform_attn_torch_backward``
computes the same three gradients without autograd, level by level through the aten
``grid_sampler_2d_backward`` op; the custom op in ``ops.py`` uses it as its CPU backward, so the
op stays a single node for autograd and ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Arguments of aten::grid_sampler_2d(_backward): interpolation 0 = bilinear, padding 0 = zeros.
_BILINEAR = 0
_ZEROS_PADDING = 0


def _level_shapes(spatial_shapes: Tensor | list[tuple[int, int]], num_keys: int) -> list[tuple[int, int]]:
    # Python ints: iterating over a CUDA tensor would sync once per level. A list is kept as given
    # (no int()): under torch.export its sizes are symbolic and must stay so for dynamic H, W.
    if isinstance(spatial_shapes, Tensor):
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    else:
        shapes = [(h, w) for h, w in spatial_shapes]
    total = sum(h * w for h, w in shapes)
    if total != num_keys:
        raise ValueError(
            f"spatial_shapes {shapes} cover {total} positions but value has S={num_keys}; value must be "
            "the flattened concatenation of all levels, so sum(h*w) over spatial_shapes must equal S"
        )
    return shapes


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
    shapes = _level_shapes(spatial_shapes, S)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, H, D) -> (B*H, D, h, w)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1).to(v.dtype)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*H, D, Q, L, P) weighted by (B*H, 1, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L, P).to(value.dtype)
    out = (torch.stack(sampled, dim=-2) * weights).sum((-1, -2))
    return out.view(B, H * D, Q).transpose(1, 2).contiguous()


def ms_deform_attn_torch_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``ms_deform_attn_torch`` without autograd.

    grad_output (B, Q, H*D) -> (grad_value (B, S, H, D), grad_sampling_locations
    (B, Q, H, L, P, 2), grad_attention_weights (B, Q, H, L, P)), each in its input's dtype.
    Works one level at a time, so it never holds the (B*H, D, Q, L, P) sampled tensor that the
    autograd version keeps.
    """
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes, S)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    # (B, Q, H*D) -> (B*H, D, Q, 1): broadcasts against the (B*H, D, Q, P) samples of a level.
    grad_out = grad_output.reshape(B, Q, H, D).permute(0, 2, 3, 1).reshape(B * H, D, Q, 1).to(value.dtype)
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L, P).to(value.dtype)
    grad_value_levels, grad_grid_levels, grad_weight_levels = [], [], []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1).to(v.dtype)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        grad_weight_levels.append((grad_out * sampled).sum(1))  # (B*H, Q, P)
        grad_v, grad_g = torch.ops.aten.grid_sampler_2d_backward(
            grad_out * weights[:, :, :, lvl], v, g, _BILINEAR, _ZEROS_PADDING, False, [True, True]
        )
        # (B*H, D, h, w) -> (B, h*w, H, D)
        grad_value_levels.append(grad_v.reshape(B, H, D, h * w).permute(0, 3, 1, 2))
        grad_grid_levels.append(grad_g)  # (B*H, Q, P, 2)
    grad_value = torch.cat(grad_value_levels, dim=1).contiguous()
    # d grid / d location = 2; (B*H, Q, L, P, 2) -> (B, Q, H, L, P, 2)
    grad_loc = (2 * torch.stack(grad_grid_levels, dim=2)).reshape(B, H, Q, L, P, 2).transpose(1, 2)
    grad_attn = torch.stack(grad_weight_levels, dim=2).reshape(B, H, Q, L, P).transpose(1, 2)
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype).contiguous(),
        grad_attn.to(attention_weights.dtype).contiguous(),
    )
