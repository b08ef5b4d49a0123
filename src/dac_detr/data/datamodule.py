"""`CocoDataModule`: any COCO-format detection data set as a LightningDataModule."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from .coco import HOW_TO_GET_DATA, CocoDetection, CocoSplit, LabelMapping, coco_api_from_dict, load_coco_split, read_json
from .collate import DetectionCollate
from .errors import DataError
from .transforms import build_train_transforms, build_val_transforms

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
COCO_TRAIN_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800


class CocoDataModule(LightningDataModule):
    """COCO-format data: ``root/{train,val}_annotations`` + ``root/{train,val}_images``.

    Batches are ``(images (B,3,H,W), pixel_mask (B,H,W) True on padding, targets)`` as
    docs/interfaces.md says. The defaults are the official COCO recipe (docs/method.md, Data and
    augmentation); every image size is an argument so small data sets can use small images.
    Validation uses the val split (COCO test-dev has no public annotations).

    Args:
        root: the data set folder; the four paths below are relative to it (or absolute).
        label_mapping: ``raw`` (class index = category id, COCO -> 91 classes, the official
            setting) or ``contiguous`` (sorted category ids -> 0..K-1).
        train_scales / train_max_size: shorter-side choices and longer-side cap for training.
        crop_resize_scales / crop_min_size / crop_max_size: the resize -> random crop branch.
        val_size / val_max_size: the evaluation resize.
        batch_size / val_batch_size: per process; ``val_batch_size=None`` uses ``batch_size``.
        drop_last: drop the last incomplete training batch (official: True).
        size_divisibility: pad H and W up to a multiple of this (1 = official, no rounding).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train_annotations: str = "annotations/instances_train2017.json",
        val_annotations: str = "annotations/instances_val2017.json",
        train_images: str = "train2017",
        val_images: str = "val2017",
        label_mapping: str = "raw",
        train_scales: Sequence[int] = COCO_TRAIN_SCALES,
        train_max_size: int = 1333,
        crop_resize_scales: Sequence[int] = (400, 500, 600),
        crop_min_size: int = 384,
        crop_max_size: int = 600,
        val_size: int = 800,
        val_max_size: int = 1333,
        hflip_prob: float = 0.5,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        size_divisibility: int = 1,
    ) -> None:
        super().__init__()
        if label_mapping not in ("raw", "contiguous"):
            raise DataError(f"data.label_mapping must be 'raw' or 'contiguous', got {label_mapping!r}.")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise DataError(f"data.batch_size and data.val_batch_size must be >= 1, got {batch_size}, {val_batch_size}.")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.root = Path(os.path.expanduser(str(root))) if root is not None else None
        self.paths = {
            "train": (train_annotations, train_images),
            "val": (val_annotations, val_images),
        }
        self.label_mapping = label_mapping
        self.train_transforms = build_train_transforms(
            train_scales, train_max_size, crop_resize_scales, crop_min_size, crop_max_size, hflip_prob
        )
        self.val_transforms = build_val_transforms(val_size, val_max_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.collate = DetectionCollate(size_divisibility)
        self._splits: dict[str, CocoSplit] = {}
        self._coco_gt: dict[str, object] = {}
        self._labels: LabelMapping | None = None
        self._datasets: dict[str, CocoDetection] = {}

    # ---------------------------------------------------------------- paths and loading
    def split_paths(self, split: str) -> tuple[Path, Path]:
        """(annotation file, image folder) of ``split``."""
        if split not in SPLITS:
            raise DataError(f"Unknown split {split!r}; the COCO data module has {SPLITS}.")
        if self.root is None:
            raise DataError(f"No data root is set (data.root is null). {HOW_TO_GET_DATA}")
        ann, images = self.paths[split]
        return self.root / ann, self.root / images

    def _check_root(self) -> None:
        if self.root is None or not self.root.is_dir():
            raise DataError(f"The data root {self.root} does not exist. {HOW_TO_GET_DATA}")

    def _load(self, split: str) -> None:
        if split in self._splits:
            return
        self._check_root()
        ann_file, image_dir = self.split_paths(split)
        loaded = load_coco_split(split, ann_file, image_dir, keep_raw=(split == "val"))
        cats = sorted(c["id"] for c in loaded.categories)
        if self._labels is None:
            self._labels = LabelMapping(loaded.categories, self.label_mapping, source=str(ann_file))
        elif cats != self._labels.category_ids:
            other = next(iter(self._splits.values())).annotation_file
            raise DataError(
                f"{ann_file} and {other} list different category ids ({cats} vs "
                f"{self._labels.category_ids}); train and val must share one category list."
            )
        if loaded.raw is not None:  # keep pycocotools' view of the untouched file for evaluation
            self._coco_gt[split] = coco_api_from_dict(loaded.raw)
            loaded.raw = None
        self._splits[split] = loaded
        transforms = self.train_transforms if split == "train" else self.val_transforms
        self._datasets[split] = CocoDetection(loaded, self._labels, transforms)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs: ``fit`` (and None) train + val, the others val."""
        if stage in (None, "fit"):
            self._load("train")
        self._load("val")

    # ---------------------------------------------------------------- what the model needs
    def _require_setup(self) -> LabelMapping:
        if self._labels is None:
            raise RuntimeError("Call setup() on the data module first (the classes come from the annotation file).")
        return self._labels

    @property
    def num_classes(self) -> int:
        """Width of the classifier (max category id + 1 for ``raw``, the number of categories otherwise)."""
        return self._require_setup().num_classes

    @property
    def class_names(self) -> list[str]:
        """Name of each class index; "N/A" for indices no category uses (``raw``)."""
        return list(self._require_setup().class_names)

    def label_to_category_id(self, label: int) -> int:
        """The COCO category id of a class index (for result files)."""
        return self._require_setup().label_to_category_id(label)

    def dataset(self, split: str) -> CocoDetection:
        self._require_setup()
        if split not in self._datasets:
            self._load(split)
        return self._datasets[split]

    def coco_gt(self, split: str = "val"):
        """The pycocotools ``COCO`` object of ``split``, built from the unmodified annotation file."""
        if split not in self._coco_gt:
            ann_file, _ = self.split_paths(split)
            if not ann_file.is_file():
                raise DataError(f"The {split} annotation file {ann_file} does not exist. {HOW_TO_GET_DATA}")
            self._coco_gt[split] = coco_api_from_dict(read_json(ann_file))
        return self._coco_gt[split]

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        # No sampler here: under DDP Lightning swaps in a DistributedSampler (keeping shuffle).
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, train=False)


class SyntheticCocoDataModule(CocoDataModule):
    """The built-in synthetic shapes set (``dac_detr.data.synthetic``) as a ``CocoDataModule``.

    The set is generated on first use (in ``prepare_data``, or in ``setup`` if that was skipped)
    into ``root``, or with ``root=None`` into the user cache folder (``$DAC_DETR_DATA``, else
    ``~/.cache/dac_detr``), and reused afterwards. The defaults suit its 128 px images: classes
    are contiguous (6), the training shorter side is drawn from 96..160 and validation uses 128.
    Every other argument is ``CocoDataModule``'s.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        num_train: int = 1500,
        num_val: int = 100,
        image_size: int = 128,
        seed: int = 0,
        max_objects: int = 4,
        small_fraction: float | None = None,
        label_mapping: str = "contiguous",
        train_scales: Sequence[int] = (96, 112, 128, 144, 160),
        train_max_size: int = 267,
        crop_resize_scales: Sequence[int] = (80, 100, 120),
        crop_min_size: int = 64,
        crop_max_size: int = 120,
        val_size: int = 128,
        val_max_size: int = 213,
        **kwargs,
    ) -> None:
        from .synthetic import default_cache_dir, synthetic_folder_name

        self.synthetic_args = dict(
            num_train=int(num_train), num_val=int(num_val), image_size=int(image_size), seed=int(seed), max_objects=int(max_objects),
            small_fraction=None if small_fraction is None else float(small_fraction),
        )
        if root is None:
            root = default_cache_dir() / synthetic_folder_name(**self.synthetic_args)
        super().__init__(
            root,
            label_mapping=label_mapping,
            train_scales=train_scales,
            train_max_size=train_max_size,
            crop_resize_scales=crop_resize_scales,
            crop_min_size=crop_min_size,
            crop_max_size=crop_max_size,
            val_size=val_size,
            val_max_size=val_max_size,
            **kwargs,
        )

    def prepare_data(self) -> None:
        from .synthetic import ensure_synthetic_coco

        ensure_synthetic_coco(self.root, **self.synthetic_args)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op when the set exists; covers callers that skip prepare_data
        super().setup(stage)
