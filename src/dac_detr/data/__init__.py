"""Data: COCO-format data modules, the DETR transforms, batching and the synthetic shapes set."""

from .coco import CocoDetection, CocoSplit, LabelMapping, load_coco_split
from .collate import DetectionCollate
from .datamodule import CocoDataModule, SyntheticCocoDataModule
from .errors import DataError
from .synthetic import default_cache_dir, ensure_synthetic_coco, generate_synthetic_coco
from .transforms import (
    RandomShortestSideResize,
    RandomSizeCrop,
    ToNormalizedCxcywh,
    build_train_transforms,
    build_val_transforms,
)

__all__ = [
    "CocoDataModule",
    "CocoDetection",
    "CocoSplit",
    "DataError",
    "DetectionCollate",
    "LabelMapping",
    "RandomShortestSideResize",
    "RandomSizeCrop",
    "SyntheticCocoDataModule",
    "ToNormalizedCxcywh",
    "build_train_transforms",
    "build_val_transforms",
    "default_cache_dir",
    "ensure_synthetic_coco",
    "generate_synthetic_coco",
    "load_coco_split",
]
