"""Sine positional encodings: one for feature maps, one for boxes (docs/method.md, Input levels and
positional encodings)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised 2-D sine encoding of a padded feature map.

    The y / x coordinates are cumulative counts over un-padded pixels, shifted by -0.5 and divided
    by the last count (+1e-6), then scaled to [0, 2π]; each axis gets ``num_pos_feats`` channels
    with sin/cos interleaved per frequency pair, and the output is ``[pos_y, pos_x]``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, h, w) bool, True on padding -> (B, 2 * num_pos_feats, h, w) float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(box_logits: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of boxes given in logit space (Deformable DETR's proposal embedding).

    box_logits (B, N, 4) -> (B, N, 4 * num_pos_feats): each of (cx, cy, w, h) is sigmoid-ed,
    scaled by 2π and encoded with ``num_pos_feats`` interleaved sin/cos features, in coordinate
    order. With the official sizes (128 per coordinate) this is the 512-d input of ``pos_trans``.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=box_logits.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = box_logits.sigmoid() * (2 * math.pi)
    return _interleave_sin_cos(pos[..., None] / dim_t).flatten(-2)


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """(..., F) -> (..., F): sin of the even features and cos of the odd ones, pairwise interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
