"""Multi-scale deformable attention module (Deformable DETR), calling ``dac_detr.kernels``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dac_detr.kernels import ms_deform_attn, ms_deform_attn_torch


def is_exporting() -> bool:
    """True while ``torch.export`` / ``torch.onnx.export`` traces the model.

    The export takes the pure-PyTorch deformable attention (``F.grid_sample`` per level, ONNX
    ``GridSample``): the custom ``dac_detr::ms_deform_attn`` op (Triton on CUDA) has no ONNX
    translation, and the level sizes must reach the graph as symbolic sizes, not as a tensor.
    """
    check = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5? absent: fall back below
    return bool((check is not None and check()) or torch.onnx.is_in_onnx_export())


class MSDeformAttn(nn.Module):
    """Each query samples ``n_points`` locations per head and level around its reference.

    Parameter names and init follow the official module (docs/method.md, Encoder), so checkpoints
    map 1:1: ``sampling_offsets`` (zero weight, bias pointing head h along angle 2πh/n_heads with
    point i scaled by i+1), ``attention_weights`` (all zero: uniform attention at init),
    ``value_proj`` and ``output_proj`` (xavier-uniform weight, zero bias). The official
    ``im2col_step`` argument has no counterpart: it only sized the batch chunks of the official
    CUDA op, the kernels here need none, and it is in no state dict (docs/kernels.md).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: list[tuple[int, int]],
        spatial_shapes_tensor: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries to the flattened multi-scale map.

        query (B, Q, d); reference_points (B, Q, L, 2) points or (B, Q, L, 4) boxes, normalised
        to [0, 1] and already scaled by each level's valid ratio; value_input (B, S, d) with
        S = Σ h_l·w_l; spatial_shapes the (h_l, w_l) as Python ints (no host sync) and the same
        as an int64 (L, 2) tensor for the kernel; level_start_index (L,); padding_mask (B, S)
        True on padding. Returns (B, Q, d).
        """
        B, Q, _ = query.shape
        S = value_input.shape[1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != L:
            raise ValueError(f"MSDeformAttn was built for {L} levels but got {len(spatial_shapes)} maps")
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.d_model // H)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, H, L * P), -1).view(B, Q, H, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (w_l, h_l)
            normalizer = spatial_shapes_tensor.flip(-1).to(query.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box: ±n_points steps span half its width / height
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}")
        if is_exporting():
            out = ms_deform_attn_torch(value, spatial_shapes, level_start_index, locations, weights)
        else:
            out = ms_deform_attn(value, spatial_shapes_tensor, level_start_index, locations, weights)
        return self.output_proj(out)
