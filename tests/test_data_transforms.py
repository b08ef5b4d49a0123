"""Box bookkeeping through every transform: the boxes must follow the pixels."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from dac_detr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomShortestSideResize,
    RandomSizeCrop,
    ToNormalizedCxcywh,
    build_train_transforms,
    build_val_transforms,
    detr_resize_size,
)
from torchvision.transforms import v2

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)


def make_sample(height=60, width=90, boxes=((5, 8, 30, 40), (50, 10, 85, 25), (40, 35, 70, 58))):
    """A black image with solid rectangles of distinct colours; label k has colour k."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        image[:, y0:y1, x0:x1] = COLOURS[k][:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(len(boxes), dtype=torch.int64),
    }
    return tv_tensors.Image(image), target


def pixel_box(image: torch.Tensor, colour: torch.Tensor) -> torch.Tensor | None:
    """xyxy box (pixel edges) of the pixels close to ``colour`` in a (3, H, W) 0..255 image."""
    close = ((image.float() - colour.float()[:, None, None]).abs().amax(0) < 60)
    if not close.any():
        return None
    ys, xs = torch.nonzero(close, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def assert_boxes_follow_pixels(image: torch.Tensor, boxes_xyxy: torch.Tensor, labels: torch.Tensor, tol: float = 1.6):
    for box, label in zip(boxes_xyxy, labels):
        if (box[2:] - box[:2]).min() < 3:
            continue  # a sliver left by a crop: interpolation blurs it below the colour test
        found = pixel_box(image, COLOURS[label])
        assert found is not None, f"label {label}: no pixels of its colour left"
        torch.testing.assert_close(box, found, atol=tol, rtol=0)


def denormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean) * 255


def cxcywh_to_pixels(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    h, w = size.tolist()
    cx, cy, bw, bh = (boxes * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), -1)


def test_detr_resize_size_rule():
    # Plain shorter-side resize; the longer side is truncated (int), as in DETR.
    assert detr_resize_size(480, 640, 800, None) == (800, 1066)
    assert detr_resize_size(640, 480, 800, None) == (1066, 800)
    # Capped: the shorter side becomes round(1333 * 480 / 1000) = 640.
    assert detr_resize_size(480, 1000, 800, 1333) == (640, 1333)
    # Already the right size: unchanged.
    assert detr_resize_size(800, 1200, 800, 1333) == (800, 1200)
    # A very long image: round(1333 * 100 / 2000) = 67, long side int(67 * 20) = 1340 (DETR's quirk).
    assert detr_resize_size(100, 2000, 800, 1333) == (67, 1340)


def test_flip_moves_boxes_with_pixels():
    image, target = make_sample()
    out_image, out = v2.RandomHorizontalFlip(p=1.0)(image, target)
    assert_boxes_follow_pixels(out_image, out["boxes"], out["labels"], tol=0)
    torch.testing.assert_close(out["boxes"][0], torch.tensor([90 - 30, 8, 90 - 5, 40], dtype=torch.float32))


@pytest.mark.parametrize("side,max_size", [(30, None), (120, None), (100, 120)])
def test_resize_scales_boxes_with_pixels(side, max_size):
    image, target = make_sample()
    out_image, out = RandomShortestSideResize([side], max_size)(image, target)
    h, w = detr_resize_size(60, 90, side, max_size)
    assert tuple(out_image.shape[-2:]) == (h, w) and out["boxes"].canvas_size == (h, w)
    assert_boxes_follow_pixels(out_image, out["boxes"], out["labels"], tol=1.6)
    torch.testing.assert_close(out["boxes"], target["boxes"] * torch.tensor([w / 90, h / 60, w / 90, h / 60]))


def test_crop_clips_boxes_and_drops_empty_ones():
    torch.manual_seed(0)
    dropped = 0
    for _ in range(30):
        image, target = make_sample()
        out_image, out = RandomSizeCrop(20, 40)(image, target)
        h, w = out_image.shape[-2:]
        assert 20 <= h <= 40 and 20 <= w <= 40
        assert len(out["boxes"]) == len(out["labels"])
        boxes = out["boxes"]
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= w and boxes[:, 1::2].max() <= h
        assert_boxes_follow_pixels(out_image, boxes, out["labels"], tol=0)  # crop is pixel-exact
        # Every object whose pixels are still in the crop keeps its box, and only those.
        visible = {k for k in range(3) if pixel_box(out_image, COLOURS[k]) is not None}
        assert set(out["labels"].tolist()) == visible
        dropped += 3 - len(boxes)
    assert dropped > 0  # 20..40 px crops of a 90x60 image must lose some objects


def test_crop_smaller_image_than_min_size_uses_whole_side():
    image, target = make_sample()
    out_image, out = RandomSizeCrop(384, 600)(image, target)
    assert tuple(out_image.shape[-2:]) == (60, 90)
    torch.testing.assert_close(out["boxes"], target["boxes"])


def test_train_pipeline_boxes_follow_pixels_over_many_draws():
    transforms = build_train_transforms(
        scales=[48, 64, 80], max_size=120, crop_resize_scales=[40, 50, 60], crop_min_size=30, crop_max_size=50
    )
    torch.manual_seed(1)
    sizes = set()
    for _ in range(25):
        image, target = make_sample()
        out_image, out = transforms(image, target)
        assert out_image.dtype == torch.float32 and out["boxes"].dtype == torch.float32
        assert type(out["boxes"]) is torch.Tensor  # plain tensor, not a tv_tensor
        h, w = out["size"].tolist()
        assert tuple(out_image.shape) == (3, h, w)
        assert min(h, w) in (48, 64, 80) or abs(max(h, w) - 120) <= 2  # a scale, or capped by max_size
        sizes.add((h, w))
        boxes = out["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert_boxes_follow_pixels(denormalise(out_image), cxcywh_to_pixels(boxes, out["size"]), out["labels"], tol=2.0)
    assert len(sizes) > 2  # multi-scale and crops give different sizes


def test_val_pipeline_is_deterministic_and_normalised():
    transforms = build_val_transforms(size=40, max_size=100)
    image, target = make_sample()
    a_image, a = transforms(image, target)
    b_image, b = transforms(image, target)
    torch.testing.assert_close(a_image, b_image)
    assert a["size"].tolist() == [40, 60]
    black = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(a_image[:, 0, -1], black)  # top-right corner is background
    expected = torch.tensor([[5, 8, 30, 40], [50, 10, 85, 25], [40, 35, 70, 58]], dtype=torch.float32)
    expected_cxcywh = torch.stack(
        ((expected[:, 0] + expected[:, 2]) / 2 / 90, (expected[:, 1] + expected[:, 3]) / 2 / 60,
         (expected[:, 2] - expected[:, 0]) / 90, (expected[:, 3] - expected[:, 1]) / 60), -1
    )
    torch.testing.assert_close(a["boxes"], expected_cxcywh)


def test_images_without_objects_pass_every_transform():
    transforms = build_train_transforms(scales=[32], max_size=64, crop_resize_scales=[40], crop_min_size=20, crop_max_size=30)
    torch.manual_seed(0)
    for _ in range(6):
        image, target = make_sample(boxes=())
        out_image, out = transforms(image, target)
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    out_image, out = ToNormalizedCxcywh()(*make_sample(boxes=()))
    assert out["boxes"].shape == (0, 4)
