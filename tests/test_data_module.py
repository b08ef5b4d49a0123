"""CocoDataModule: the batch contract, collate masks, label mappings and every bad-input error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dac_detr.data import CocoDataModule, DataError, DetectionCollate, LabelMapping, load_coco_split

SMALL = dict(
    train_scales=[32, 40], train_max_size=64, crop_resize_scales=[30], crop_min_size=20, crop_max_size=30,
    val_size=32, val_max_size=64, batch_size=2, num_workers=0,
)


def write_coco(root: Path, images=None, annotations=None, categories=None, split="train", write_images=True) -> Path:
    """A tiny COCO-format folder: 2 images (48x64 and 40x40) unless told otherwise."""
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 40},
    ]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 10], "iscrowd": 0, "area": 200},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 16, 16], "iscrowd": 0, "area": 256},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0, "area": 100},
    ]
    categories = categories if categories is not None else [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    if write_images:
        for img in images:
            Image.new("RGB", (img["width"], img["height"]), (90, 120, 200)).save(root / f"{split}2017" / img["file_name"])
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_both(root: Path, **kwargs) -> Path:
    write_coco(root, split="val", **kwargs)
    return write_coco(root, split="train", **kwargs)


# ------------------------------------------------------------------------------------- collate
def test_collate_pads_bottom_right_and_masks_padding():
    a = torch.randn(3, 5, 7)
    b = torch.randn(3, 6, 4)
    images, mask, targets = DetectionCollate()([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7) and mask.dtype == torch.bool
    torch.testing.assert_close(images[0, :, :5, :7], a)
    torch.testing.assert_close(images[1, :, :6, :4], b)
    assert not mask[0, :5, :].any() and mask[0, 5:, :].all()
    assert not mask[1, :, :4].any() and mask[1, :, 4:].all()
    assert (images[0, :, 5:] == 0).all() and (images[1, :, :, 4:] == 0).all()
    assert [t["i"] for t in targets] == [0, 1]


def test_collate_size_divisibility():
    images, mask, _ = DetectionCollate(size_divisibility=4)([(torch.ones(3, 5, 7), {})])
    assert images.shape[-2:] == (8, 8) and mask[0, 5:].all() and mask[0, :, 7:].all() and not mask[0, :5, :7].any()


# ------------------------------------------------------------------------------------- contract
def test_batches_follow_the_interface(tmp_path):
    write_both(tmp_path)
    dm = CocoDataModule(tmp_path, label_mapping="contiguous", drop_last=False, **SMALL)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    assert [dm.label_to_category_id(k) for k in range(2)] == [1, 2]
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, mask, targets = next(iter(loader))
        assert images.dtype == torch.float32 and images.dim() == 4 and images.shape[1] == 3
        assert mask.dtype == torch.bool and mask.shape == (images.shape[0], *images.shape[-2:])
        for i, t in enumerate(targets):
            assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
            assert t["boxes"].shape == (len(t["labels"]), 4)
            assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
            assert t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0
            assert t["orig_size"].dtype == torch.int64 and t["size"].dtype == torch.int64
            h, w = t["size"].tolist()
            assert not mask[i, :h, :w].any() and mask[i].sum() == mask.shape[1] * mask.shape[2] - h * w
    val_images, val_mask, val_targets = next(iter(dm.val_dataloader()))
    t = {int(x["image_id"]): x for x in val_targets}
    assert t[1]["orig_size"].tolist() == [48, 64] and t[1]["size"].tolist() == [32, 42]  # 48x64 -> 32x42
    # Box 1 of image 1 is [4, 4, 24, 14] in a 64x48 image.
    torch.testing.assert_close(t[1]["boxes"][0], torch.tensor([14 / 64, 9 / 48, 20 / 64, 10 / 48]))
    assert dm.coco_gt("val").getImgIds() == [1, 2]


def test_loader_settings(tmp_path):
    write_both(tmp_path)
    dm = CocoDataModule(tmp_path, **{**SMALL, "num_workers": 1, "val_batch_size": 1})
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last
    assert train.persistent_workers and train.num_workers == 1
    assert train.batch_size == 2 and val.batch_size == 1
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    no_workers = CocoDataModule(tmp_path, **SMALL)
    no_workers.setup("validate")
    assert not no_workers.val_dataloader().persistent_workers  # persistence needs workers


def test_corrupt_image_file_is_named(tmp_path):
    write_both(tmp_path)
    (tmp_path / "val2017" / "a.png").write_bytes(b"\x89PNG not really")
    dm = CocoDataModule(tmp_path, **SMALL)
    dm.setup("validate")
    with pytest.raises(DataError, match="a.png cannot be decoded"):
        dm.dataset("val")[0]


def test_raw_mapping_uses_category_ids_and_names_gaps(tmp_path):
    cats = [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}, {"id": 20, "name": "twenty"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 20, "bbox": [1, 1, 10, 10], "iscrowd": 0},
    ]
    write_both(tmp_path, annotations=anns, categories=cats)
    raw = CocoDataModule(tmp_path, label_mapping="raw", **SMALL)
    raw.setup("validate")
    assert raw.num_classes == 21 and raw.class_names[7] == "seven" and raw.class_names[0] == "N/A"
    assert raw.label_to_category_id(20) == 20
    assert raw.dataset("val")[0][1]["labels"].tolist() == [7]
    # Non-contiguous ids are handled by the contiguous mapping.
    contiguous = CocoDataModule(tmp_path, label_mapping="contiguous", **SMALL)
    contiguous.setup("validate")
    assert contiguous.num_classes == 3 and contiguous.class_names == ["three", "seven", "twenty"]
    assert [contiguous.label_to_category_id(k) for k in range(3)] == [3, 7, 20]
    assert contiguous.dataset("val")[1][1]["labels"].tolist() == [2]


def test_empty_images_are_kept(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0}]
    write_both(tmp_path, annotations=anns)
    dm = CocoDataModule(tmp_path, **SMALL)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 2
    image, target = dm.dataset("val")[1]
    assert target["labels"].shape == (0,) and target["boxes"].shape == (0, 4)


# ------------------------------------------------------------------------------------- bad input
def test_missing_root_says_how_to_get_data(tmp_path):
    dm = CocoDataModule(tmp_path / "nowhere", **SMALL)
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert str(tmp_path / "nowhere") in str(e.value) and "data=synthetic" in str(e.value) and "data.root" in str(e.value)


def test_missing_annotation_file_names_it(tmp_path):
    write_coco(tmp_path, split="val")
    dm = CocoDataModule(tmp_path, **SMALL)
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert "instances_train2017.json" in str(e.value) and "data=synthetic" in str(e.value)


def test_truncated_json_gives_file_and_position(tmp_path):
    path = write_coco(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError) as e:
        load_coco_split("train", path, tmp_path / "train2017")
    message = str(e.value)
    assert str(path) in message and "line 1, column" in message and f"character {len(text) // 2}" in message


def test_corrupt_json_structure(tmp_path):
    path = write_coco(tmp_path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no 'annotations' list"):
        load_coco_split("train", path, tmp_path / "train2017")


def test_missing_image_file_is_named(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "train2017" / "b.png").unlink()
    with pytest.raises(DataError) as e:
        load_coco_split("train", path, tmp_path / "train2017")
    assert "b.png" in str(e.value) and "1 image file" in str(e.value)


def test_image_size_mismatch_is_reported(tmp_path):
    write_both(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "val2017" / "b.png")
    dm = CocoDataModule(tmp_path, **SMALL)
    dm.setup("validate")
    with pytest.raises(DataError, match="b.png is 10x10"):
        dm.dataset("val")[1]


def test_boxes_outside_the_image_are_clamped_and_counted(tmp_path, caplog):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-5, 40, 20, 30], "iscrowd": 0},  # crosses left and bottom
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "iscrowd": 0},
    ]
    path = write_coco(tmp_path, annotations=anns)
    with caplog.at_level(logging.INFO, logger="dac_detr.data.coco"):
        split = load_coco_split("train", path, tmp_path / "train2017")
    assert split.stats.boxes_clamped == 1 and split.stats.degenerate_dropped == 0
    np.testing.assert_allclose(split.boxes_xyxy[0], [0, 40, 15, 48])
    assert "clamped 1 boxes" in caplog.text


def test_zero_size_and_crowd_boxes_are_dropped_and_counted(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 0, 10], "iscrowd": 0},  # zero width
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [70, 4, 5, 5], "iscrowd": 0},  # fully right of a 64-wide image
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [4, 4, 10, 10], "iscrowd": 1},  # crowd
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "iscrowd": 0},
    ]
    path = write_coco(tmp_path, annotations=anns)
    split = load_coco_split("train", path, tmp_path / "train2017")
    assert split.stats.degenerate_dropped == 2 and split.stats.crowd_removed == 1 and split.stats.boxes_clamped == 1
    assert split.num_objects == 1 and len(split) == 2


def test_negative_width_or_height_is_one_warning_naming_the_box_format(tmp_path, caplog):
    anns = [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [20, 20, -10, 10], "iscrowd": 0},  # x0 y0 x1 y1 read as xywh
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, -5], "iscrowd": 0},
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [4, 4, 0, 10], "iscrowd": 0},  # zero width: INFO only
        {"id": 10, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "iscrowd": 0},
    ]
    path = write_coco(tmp_path, annotations=anns)
    with caplog.at_level(logging.INFO, logger="dac_detr.data.coco"):
        split = load_coco_split("train", path, tmp_path / "train2017")
    assert split.num_objects == 1 and split.stats.degenerate_dropped == 3 and split.stats.negative_size == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per file, not once per box
    assert "2 boxes have a negative width or height" in warnings[0].message
    assert "annotation 7" in warnings[0].message and "[x, y, width, height]" in warnings[0].message


def test_negative_category_ids_need_the_contiguous_mapping(tmp_path):
    cats = [{"id": -1, "name": "odd"}, {"id": 4, "name": "four"}]
    anns = [{"id": 1, "image_id": 1, "category_id": -1, "bbox": [1, 1, 10, 10], "iscrowd": 0}]
    write_both(tmp_path, annotations=anns, categories=cats)
    with pytest.raises(DataError, match="label_mapping=contiguous"):
        CocoDataModule(tmp_path, label_mapping="raw", **SMALL).setup("validate")
    dm = CocoDataModule(tmp_path, label_mapping="contiguous", **SMALL)
    dm.setup("validate")
    assert dm.num_classes == 2 and dm.label_to_category_id(0) == -1


def test_empty_split_is_an_error(tmp_path):
    path = write_coco(tmp_path, images=[], annotations=[])
    with pytest.raises(DataError, match="split is empty"):
        load_coco_split("train", path, tmp_path / "train2017")
    path = write_coco(tmp_path, annotations=[])
    with pytest.raises(DataError, match="no usable objects"):
        load_coco_split("train", path, tmp_path / "train2017")


def test_unknown_references_and_mismatched_splits(tmp_path):
    bad = [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 0}]
    path = write_coco(tmp_path, annotations=bad)
    with pytest.raises(DataError, match="category id 5, which is not in 'categories'"):
        load_coco_split("train", path, tmp_path / "train2017")
    write_coco(tmp_path, split="train")
    write_coco(tmp_path, split="val", categories=[{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "x"}])
    with pytest.raises(DataError, match="different category ids"):
        CocoDataModule(tmp_path, **SMALL).setup("fit")


def test_bad_label_mapping_name():
    with pytest.raises(DataError, match="'raw' or 'contiguous'"):
        CocoDataModule("/tmp", label_mapping="sorted")
    with pytest.raises(DataError):
        LabelMapping([{"id": 1}], mode="dense")
