"""Batching: pad images bottom-right to the batch maximum and mark the padding."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class DetectionCollate:
    """``collate([(image (3, h_i, w_i), target), ...]) -> (images, pixel_mask, targets)``.

    ``images`` (B, 3, H, W) is zero-padded bottom-right to the largest H and W of the batch
    (rounded up to ``size_divisibility``; 1 = none, the official setting); ``pixel_mask``
    (B, H, W) bool is True on padding (the DETR convention); ``targets`` is the list of target
    dicts, unchanged. Images are normalised before padding, so the padding is the zero of the
    normalised image, as in DETR's ``nested_tensor_from_tensor_list``.
    """

    def __init__(self, size_divisibility: int = 1) -> None:
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}.")
        self.size_divisibility = int(size_divisibility)

    def __call__(self, batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
        images, targets = zip(*batch)
        d = self.size_divisibility
        height = -(-max(im.shape[-2] for im in images) // d) * d
        width = -(-max(im.shape[-1] for im in images) // d) * d
        padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        pixel_mask = torch.ones((len(images), height, width), dtype=torch.bool)
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            padded[i, :, :h, :w] = im
            pixel_mask[i, :h, :w] = False
        return padded, pixel_mask, list(targets)
