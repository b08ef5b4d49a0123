"""The two containers the batched matcher, assigner and criterion pass around.

* :class:`PaddedTargets`: the B images' GTs padded to the largest GT count M, built once per
  criterion call, so every cost, score and gather over GTs is one tensor operation for the
  whole batch (and for all stacked decoder layers) instead of one per image.
* :class:`LayerPairs`: K assigned (layer, image, query, GT) pairs over L stacked decoder layers,
  as flat index tensors ordered by layer, then image, then as the assignment orders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PaddedTargets:
    """labels (B, M) int64 (padding 0), boxes (B, M, 4) cxcywh (padding a centred 0.5 box),
    valid (B, M) bool, sizes: the B GT counts (Python ints, known without a device sync)."""

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    sizes: tuple[int, ...]

    @staticmethod
    def from_targets(targets: list[dict[str, Tensor]], dtype: torch.dtype, device: torch.device) -> "PaddedTargets":
        """Targets (``labels`` (M_b,), ``boxes`` (M_b, 4)) -> padded, boxes in ``dtype`` on ``device``."""
        sizes = tuple(int(t["labels"].shape[0]) for t in targets)
        max_gt = max(sizes, default=0)
        labels = torch.zeros(len(targets), max_gt, dtype=torch.int64, device=device)
        boxes = torch.full((len(targets), max_gt, 4), 0.5, dtype=dtype, device=device)
        for b, (t, n) in enumerate(zip(targets, sizes)):
            if n:
                labels[b, :n] = t["labels"].to(device)
                boxes[b, :n] = t["boxes"].to(device=device, dtype=dtype)
        valid = torch.arange(max_gt, device=device)[None, :] < torch.tensor(sizes, device=device).view(-1, 1)
        return PaddedTargets(labels, boxes, valid, sizes)

    @property
    def max_gt(self) -> int:
        return self.labels.shape[1]

    @property
    def num_gt(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class LayerPairs:
    """K pairs over L stacked layers: ``layer_idx, batch_idx, query_idx, gt_idx``, each (K,) int64.

    ``gt_idx`` indexes the image's own GTs (a column of :class:`PaddedTargets`).
    """

    layer_idx: Tensor
    batch_idx: Tensor
    query_idx: Tensor
    gt_idx: Tensor
    num_layers: int

    def __len__(self) -> int:
        return self.query_idx.shape[0]

    def per_image(self, layer: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """The pairs of one layer as B ``(query_idx, gt_idx)`` (the per-image interface)."""
        in_layer = self.layer_idx == layer
        batch_idx, query_idx, gt_idx = self.batch_idx[in_layer], self.query_idx[in_layer], self.gt_idx[in_layer]
        return [(query_idx[batch_idx == b], gt_idx[batch_idx == b]) for b in range(batch_size)]

    @staticmethod
    def repeated(batch_idx: Tensor, query_idx: Tensor, gt_idx: Tensor, num_layers: int) -> "LayerPairs":
        """The same K pairs in each of ``num_layers`` layers (the fixed denoising pairing)."""
        k = query_idx.shape[0]
        layer_idx = torch.arange(num_layers, device=query_idx.device).repeat_interleave(k)
        return LayerPairs(layer_idx, batch_idx.repeat(num_layers), query_idx.repeat(num_layers),
                          gt_idx.repeat(num_layers), num_layers)
