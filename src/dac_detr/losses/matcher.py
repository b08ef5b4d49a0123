"""Hungarian (one-to-one) matching of predictions to ground truth (docs/method.md, "## Hungarian matching").

Used for every O-Decoder layer and, with every label set to 0, for the encoder's proposals over
all encoder tokens. The cost matrix is built on the predictions' device for the whole batch at
once (GTs padded to the largest image), then each image's block is solved on the CPU with
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dac_detr.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from dac_detr.losses.pairs import LayerPairs, PaddedTargets


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class·C_cls + cost_bbox·L1 − cost_giou·GIoU.

    The class cost is the focal-style cost of Deformable DETR, evaluated at the GT class:
    ``alpha·(1−p)^gamma·(−log(p+1e-8)) − (1−alpha)·p^gamma·(−log(1−p+1e-8))`` with p the sigmoid
    probability (the 1e-8 is the official one, kept so that matching is identical).

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (official 2 / 5 / 2).
        focal_alpha, focal_gamma: the focal class cost's alpha and gamma (official 0.25 / 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0; "
                             "set at least one of them (the official values are 2, 5, 2)")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}")

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """Matching costs of every prediction with every (padded) GT of its own image.

        Args:
            pred_logits: (B, Q, C) logits; pred_boxes: (B, Q, 4) cxcywh in [0, 1].
            gt_labels: (B, M) int64 class ids; gt_boxes: (B, M, 4) cxcywh (M = the largest GT
                count of the batch; the padding columns are ignored by the caller).
        Returns:
            (B, Q, M) costs, lower is better.
        """
        if pred_logits.dtype in (torch.float16, torch.bfloat16):
            pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()
        gt_boxes = gt_boxes.to(pred_boxes.dtype)
        batch, num_queries = pred_logits.shape[:2]
        index = gt_labels[:, None, :].expand(batch, num_queries, gt_labels.shape[1])
        prob = torch.gather(pred_logits, 2, index).sigmoid()  # (B, Q, M): p of each GT's class
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos_cost = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        neg_cost = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        cost_cls = pos_cost - neg_cost
        cost_l1 = torch.cdist(pred_boxes, gt_boxes, p=1)
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(pred_boxes)[:, :, None, :], box_cxcywh_to_xyxy(gt_boxes)[:, None, :, :]
        )
        return self.cost_bbox * cost_l1 + self.cost_class * cost_cls - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
                ) -> list[tuple[Tensor, Tensor]]:
        """Match every image's predictions to its GTs.

        Args:
            pred_logits: (B, Q, C) logits; pred_boxes: (B, Q, 4) cxcywh.
            targets: B dicts with ``labels`` (M_b,) int64 and ``boxes`` (M_b, 4) cxcywh.
        Returns:
            B pairs ``(pred_idx, gt_idx)``, int64 (min(Q, M_b),) on the predictions' device,
            pred_idx ascending.
        """
        batch = pred_logits.shape[0]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {batch} images of predictions but {len(targets)} targets")
        padded = PaddedTargets.from_targets(targets, pred_boxes.dtype, pred_logits.device)
        return self.match_layers(pred_logits[None], pred_boxes[None], padded).per_image(0, batch)

    @torch.no_grad()
    def match_layers(self, pred_logits: Tensor, pred_boxes: Tensor, targets: PaddedTargets) -> LayerPairs:
        """Match L stacked layers at once: one cost computation and one transfer to the CPU for
        all layers and images, then one ``linear_sum_assignment`` per layer and image.

        Args:
            pred_logits: (L, B, Q, C) logits; pred_boxes: (L, B, Q, 4) cxcywh.
            targets: the batch's GTs, padded (:class:`PaddedTargets`).
        Returns:
            :class:`LayerPairs` ordered by layer, image, then query index ascending; each layer
            and image has min(Q, M_b) pairs.
        """
        device = pred_logits.device
        num_layers, batch, num_queries = pred_logits.shape[:3]
        if len(targets.sizes) != batch:
            raise ValueError(f"HungarianMatcher: {batch} images of predictions but {len(targets.sizes)} targets")
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if targets.max_gt == 0 or num_queries == 0:
            return LayerPairs(empty, empty, empty, empty, num_layers)
        max_gt = targets.max_gt
        gt_labels = targets.labels[None].expand(num_layers, batch, max_gt).reshape(-1, max_gt)
        gt_boxes = targets.boxes.to(pred_boxes.dtype)[None].expand(num_layers, batch, max_gt, 4).reshape(-1, max_gt, 4)
        costs = self.cost_matrix(pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1), gt_labels, gt_boxes)
        costs = costs.cpu().numpy()  # (L·B, Q, M); padded columns are never read
        if not np.isfinite(costs).all():
            self._raise_not_finite(costs, targets.sizes)
        rows_all, cols_all, counts = [], [], []
        for block, n in zip(costs, targets.sizes * num_layers):
            rows, cols = linear_sum_assignment(block[:, :n])
            rows_all.append(rows)
            cols_all.append(cols)
            counts.append(len(rows))
        # the layer and image of every pair follow from the counts: no per-image tensors
        owner = np.repeat(np.arange(num_layers * batch), counts)
        flat = torch.as_tensor(np.stack([owner // batch, owner % batch, np.concatenate(rows_all),
                                         np.concatenate(cols_all)]), dtype=torch.int64).to(device)  # one transfer
        return LayerPairs(flat[0], flat[1], flat[2], flat[3], num_layers)

    @staticmethod
    def _raise_not_finite(costs: np.ndarray, sizes: tuple[int, ...]) -> None:
        batch = len(sizes)
        for index, block in enumerate(costs):
            if not np.isfinite(block[:, : sizes[index % batch]]).all():
                layer, image = divmod(index, batch)
                raise ValueError(
                    f"HungarianMatcher: the matching cost of image {image} (stacked layer {layer}) has NaN/inf "
                    "entries: the predicted logits or boxes are not finite (a diverged model; lower the learning "
                    "rate or check for fp16 overflow), or a GT box is not finite (check the data)"
                )
