"""Joint image + box transforms (torchvision.transforms.v2 / tv_tensors), the DETR recipe.

Every transform takes and returns ``(image, target)``: ``image`` a ``tv_tensors.Image``,
``target`` a dict with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, absolute pixels) and
``labels`` (int64 (N,)). The last step, ``ToNormalizedCxcywh``, turns the boxes into a plain
normalised cxcywh tensor and adds ``size``.

The resize and crop reproduce the official Deformable-DETR ``datasets/transforms.py`` exactly
(docs/method.md, Data and augmentation): v2's ``RandomShortestSize`` rounds the sizes differently
and v2 has no ``RandomSizeCrop``, so both are written here on top of ``v2.functional``. Randomness
comes from torch's global generator, which Lightning seeds per data-loader worker.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict[str, Tensor]


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included (Python's random.randint)."""
    return int(torch.randint(low, high + 1, ()))


def detr_resize_size(height: int, width: int, shortest_side: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``shortest_side`` with the longer side capped.

    The DETR rule (``get_size_with_aspect_ratio``): with a cap, the shorter side becomes
    ``round(max_size * short / long)`` when the plain resize would exceed ``max_size``; the
    longer side is then truncated, ``int(size * long / short)``.
    """
    size = shortest_side
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize(image: tv_tensors.Image, target: Target, size: tuple[int, int]) -> tuple[tv_tensors.Image, Target]:
    if tuple(image.shape[-2:]) == tuple(size):
        return image, target
    image = F.resize(image, list(size), antialias=True)
    return image, {**target, "boxes": F.resize(target["boxes"], list(size))}


class RandomShortestSideResize(v2.Transform):
    """Resize so the shorter side is one of ``sizes`` (uniform choice), the longer side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        if len(sizes) == 0:
            raise ValueError("RandomShortestSideResize needs at least one size.")
        self.sizes = [int(s) for s in sizes]
        self.max_size = None if max_size is None else int(max_size)

    def forward(self, image: tv_tensors.Image, target: Target) -> tuple[tv_tensors.Image, Target]:
        side = self.sizes[_randint(0, len(self.sizes) - 1)] if len(self.sizes) > 1 else self.sizes[0]
        h, w = image.shape[-2:]
        return _resize(image, target, detr_resize_size(h, w, side, self.max_size))


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose width and height are drawn independently in [min_size, max_size].

    Sizes are capped by the image (and a ``min_size`` larger than the image means the whole side,
    so tiny test images work). Boxes are clipped to the crop; boxes left with no width or height
    are dropped together with their labels, as DETR's ``crop`` does.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if min_size < 1 or max_size < min_size:
            raise ValueError(f"RandomSizeCrop needs 1 <= min_size <= max_size, got {min_size}, {max_size}.")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def forward(self, image: tv_tensors.Image, target: Target) -> tuple[tv_tensors.Image, Target]:
        img_h, img_w = image.shape[-2:]
        w = _randint(min(self.min_size, img_w), min(img_w, self.max_size))
        h = _randint(min(self.min_size, img_h), min(img_h, self.max_size))
        top = _randint(0, img_h - h)
        left = _randint(0, img_w - w)
        image = F.crop(image, top, left, h, w)
        boxes = F.crop(target["boxes"], top, left, h, w)  # shifted and clipped to the crop
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {**target, "boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": target["labels"][keep]}
        return image, target


class ToNormalizedCxcywh(v2.Transform):
    """Boxes to a plain float32 (N, 4) cxcywh tensor divided by the image (w, h, w, h); adds ``size``."""

    def forward(self, image: tv_tensors.Image, target: Target) -> tuple[tv_tensors.Image, Target]:
        h, w = image.shape[-2:]
        xyxy = target["boxes"].as_subclass(Tensor).float()
        cxcywh = torch.stack(
            ((xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]),
            dim=-1,
        )
        boxes = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, {**target, "boxes": boxes, "size": torch.tensor([h, w], dtype=torch.int64)}


def _to_normalised_tensor() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToNormalizedCxcywh()]


def build_train_transforms(
    scales: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_resize_scales: Sequence[int] = (400, 500, 600),
    crop_min_size: int = 384,
    crop_max_size: int = 600,
    hflip_prob: float = 0.5,
) -> v2.Compose:
    """The official training augmentation (docs/method.md, Data and augmentation), with every size
    configurable.

    flip(p) -> one of, with p = 0.5 each: [shorter side in ``scales``, longer <= ``max_size``] or
    [shorter side in ``crop_resize_scales`` -> random crop of [crop_min_size, crop_max_size] ->
    shorter side in ``scales``, longer <= ``max_size``] -> float, ImageNet normalisation -> boxes
    normalised cxcywh.
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(hflip_prob),
            v2.RandomChoice(
                [
                    RandomShortestSideResize(scales, max_size),
                    v2.Compose(
                        [
                            RandomShortestSideResize(crop_resize_scales),
                            RandomSizeCrop(crop_min_size, crop_max_size),
                            RandomShortestSideResize(scales, max_size),
                        ]
                    ),
                ]
            ),
            *_to_normalised_tensor(),
        ]
    )


def build_val_transforms(size: int = 800, max_size: int = 1333) -> v2.Compose:
    """Deterministic evaluation transform: shorter side ``size``, longer <= ``max_size``, normalised."""
    return v2.Compose([RandomShortestSideResize([size], max_size), *_to_normalised_tensor()])
