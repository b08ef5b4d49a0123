"""A tiny conv backbone for detector tests: three strided convs with the backbone contract
(strides 8/16/32, masks resized from the image mask), fast enough for every switch combination."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyBackbone(nn.Module):
    def __init__(self, channels=(8, 16, 24)):
        super().__init__()
        self.num_channels = list(channels)
        self.strides = [8, 16, 32]
        ins = [3, *channels[:-1]]
        self.body = nn.ModuleList(nn.Conv2d(i, o, 3, stride=s, padding=1) for i, o, s in zip(ins, channels, (8, 2, 2)))

    def forward(self, images, pixel_mask):
        out, x = [], images
        for conv in self.body:
            x = F.relu(conv(x))
            out.append((x, F.interpolate(pixel_mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]))
        return out
