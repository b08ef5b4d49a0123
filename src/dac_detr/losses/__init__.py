"""DAC-DETR's training signal: Hungarian matching, the one-to-many assigner, the loss functions
and the criterion that turns a detector output dict into named, weighted loss terms."""

from dac_detr.losses.assigner import OneToManyAssigner
from dac_detr.losses.criterion import SetCriterion
from dac_detr.losses.functional import (
    box_giou_loss,
    box_l1_loss,
    ia_bce_loss,
    iou_aware_quality,
    paired_box_iou,
    rank_weights,
    rank_within_groups,
    sigmoid_focal_loss,
)
from dac_detr.losses.matcher import HungarianMatcher

__all__ = [
    "HungarianMatcher",
    "OneToManyAssigner",
    "SetCriterion",
    "box_giou_loss",
    "box_l1_loss",
    "ia_bce_loss",
    "iou_aware_quality",
    "paired_box_iou",
    "rank_weights",
    "rank_within_groups",
    "sigmoid_focal_loss",
]
