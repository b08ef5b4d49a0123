"""COCO-format annotations: loading, cleaning, label mapping and the image data set.

A split is read once (``load_coco_split``): crowd annotations are removed, boxes are clamped to the
image and boxes left with no width or height are dropped, as the official DETR/Deformable-DETR
``ConvertCocoPolysToMask`` does on every load. The cleaned boxes are kept as a few flat numpy
arrays rather than millions of small Python objects, so forked data-loader workers do not slowly
copy the annotation list (the well-known "memory grows with num_workers" problem).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError

log = logging.getLogger(__name__)

LABEL_MAPPINGS = ("raw", "contiguous")
# A `raw` mapping makes the classifier as wide as the largest category id + 1; past this, the ids
# are clearly not meant as class indices (e.g. hashed ids) and `contiguous` is the right choice.
MAX_RAW_CATEGORY_ID = 100_000

HOW_TO_GET_DATA = (
    "Point `data.root` at a COCO-format folder (for COCO 2017: `data=coco data.root=/path/to/coco` "
    "with annotations/instances_{train,val}2017.json, train2017/ and val2017/), or use the built-in "
    "synthetic set with `data=synthetic`, which is generated on first use."
)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, turning a decoding failure into a DataError that gives the position."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (character "
            f"{e.pos} of {path.stat().st_size} bytes). The file is probably truncated or corrupt "
            "(an interrupted download or copy); download or regenerate it."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not a UTF-8 JSON file (undecodable byte at position {e.start}); "
            "check that the annotation path points at the instances_*.json file."
        ) from None


@dataclass
class CleaningStats:
    """What `load_coco_split` removed or changed, for the log and for tests."""

    crowd_removed: int = 0
    boxes_clamped: int = 0
    degenerate_dropped: int = 0
    negative_size: int = 0  # of the dropped ones: width or height < 0 in the file (a format mistake)
    first_negative: str = ""  # the first such annotation, for the warning

    def summary(self) -> str:
        return (
            f"removed {self.crowd_removed} crowd annotations, clamped {self.boxes_clamped} boxes "
            f"that crossed the image border, dropped {self.degenerate_dropped} boxes with zero "
            "width or height (after clamping)"
        )


@dataclass
class CocoSplit:
    """One cleaned COCO-format split.

    Image i has the boxes ``boxes_xyxy[offsets[i]:offsets[i+1]]`` (absolute pixels, float32) and
    the category ids ``category_ids[offsets[i]:offsets[i+1]]``; images without objects have an
    empty slice.
    """

    name: str
    annotation_file: Path
    image_dir: Path
    image_ids: np.ndarray  # (I,) int64
    file_names: list[str]
    heights: np.ndarray  # (I,) int64
    widths: np.ndarray  # (I,) int64
    offsets: np.ndarray  # (I + 1,) int64
    boxes_xyxy: np.ndarray  # (A, 4) float32
    category_ids: np.ndarray  # (A,) int64
    categories: list[dict]
    stats: CleaningStats = field(default_factory=CleaningStats)
    raw: dict | None = None  # the parsed file, kept only when the caller asks (for evaluation)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_objects(self) -> int:
        return len(self.category_ids)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def _check_images_exist(image_dir: Path, file_names: Sequence[str], annotation_file: Path) -> None:
    if not image_dir.is_dir():
        raise DataError(
            f"The image folder {image_dir} (for {annotation_file.name}) does not exist. "
            f"{HOW_TO_GET_DATA}"
        )
    # One directory listing instead of one stat per image: COCO train has 118k files.
    present = set(os.listdir(image_dir))

    def is_missing(name: str) -> bool:
        if "/" in name or os.sep in name:  # a file in a sub-folder of the image folder
            return not (image_dir / name).is_file()
        return name not in present

    missing = [name for name in file_names if is_missing(name)]
    if missing:
        shown = ", ".join(str(image_dir / m) for m in missing[:3])
        raise DataError(
            f"{annotation_file} refers to {len(missing)} image file(s) that do not exist, e.g. "
            f"{shown}. Check `data.*_images` (the image folder of this split) or re-download / "
            "regenerate the images."
        )


def load_coco_split(
    name: str, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, keep_raw: bool = False
) -> CocoSplit:
    """Read and clean one COCO-format split.

    Crowd annotations are removed, boxes are clamped to [0, width] x [0, height] and boxes with
    no width or height after clamping are dropped (each counted and logged). Images without
    objects are kept. Raises DataError for anything that makes the file unusable.

    The steps: read the file and check its three lists (``_read_instances``), check the categories
    (``_category_ids``) and the images (``_image_table``), check that the image files exist, clean
    the annotations into per-image boxes (``_clean_annotations``), then pack them into flat arrays
    (``_pack``).
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    data = _read_instances(name, annotation_file)
    where = str(annotation_file)
    known_cats = _category_ids(data["categories"], where)
    images = _image_table(data["images"], where)
    _check_images_exist(image_dir, images.file_names, annotation_file)
    boxes, cats, stats = _clean_annotations(data["annotations"], images, known_cats, where)
    _require(
        any(cats),
        f"The {name} split has no usable objects: {where} has {len(images.ids)} images but no non-crowd "
        f"annotation with a positive-size box ({stats.summary()}). A detector cannot be trained or "
        "evaluated on it; check that the right annotation file is configured.",
    )
    split = _pack(name, annotation_file, image_dir, images, boxes, cats, data, stats, keep_raw)
    log.info("%s split (%s): %d images (%d without objects), %d objects; %s", name, annotation_file, len(split),
             sum(1 for c in cats if not c), split.num_objects, stats.summary())
    if stats.negative_size:
        log.warning(
            "%s: %d boxes have a negative width or height (first: %s) and were dropped. COCO boxes are "
            "[x, y, width, height]; a file written with [x0, y0, x1, y1] boxes gives this: convert them.",
            where, stats.negative_size, stats.first_negative,
        )
    return split


def _read_instances(name: str, annotation_file: Path) -> dict:
    """The parsed annotation file, checked to hold the 'images', 'annotations', 'categories' lists
    and at least one image."""
    if not annotation_file.is_file():
        raise DataError(f"The {name} annotation file {annotation_file} does not exist. {HOW_TO_GET_DATA}")
    data = read_json(annotation_file)
    where = str(annotation_file)
    _require(isinstance(data, dict), f"{where} must hold a JSON object with 'images', 'annotations' and 'categories'.")
    for key in ("images", "annotations", "categories"):
        _require(
            isinstance(data.get(key), list),
            f"{where} has no '{key}' list; a COCO-format instances file needs 'images', 'annotations' "
            "and 'categories'.",
        )
    _require(
        len(data["images"]) > 0,
        f"The {name} split is empty: {where} lists no images. Use a file with at least one image "
        "(for a quick run, `data=synthetic`).",
    )
    return data


def _category_ids(categories: list, where: str) -> set[int]:
    """The set of category ids; each category must have a unique integer 'id'."""
    _require(len(categories) > 0, f"{where} lists no categories; at least one is needed to train a detector.")
    cat_ids = []
    for c in categories:
        _require(
            isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool),
            f"{where}: every category needs an integer 'id' (found {c!r}).",
        )
        cat_ids.append(c["id"])
    _require(len(set(cat_ids)) == len(cat_ids), f"{where}: category ids are not unique ({sorted(cat_ids)}).")
    return set(cat_ids)


@dataclass
class _ImageTable:
    """The images of a split in file order: ids, file names, sizes and id -> row."""

    ids: list = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    index_of: dict = field(default_factory=dict)


def _image_table(images: list, where: str) -> _ImageTable:
    """Each image entry checked (id, file_name, positive width and height; ids unique)."""
    table = _ImageTable()
    for img in images:
        try:
            iid, fname, h, w = img["id"], img["file_name"], int(img["height"]), int(img["width"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{where}: image entry {img!r} lacks 'id', 'file_name', 'width' or 'height'; "
                "every COCO image needs all four."
            ) from None
        _require(iid not in table.index_of, f"{where}: image id {iid} appears twice in 'images'.")
        _require(h > 0 and w > 0, f"{where}: image {fname} has a non-positive size {w}x{h}.")
        table.index_of[iid] = len(table.ids)
        table.ids.append(iid)
        table.file_names.append(fname)
        table.heights.append(h)
        table.widths.append(w)
    return table


def _clean_annotations(
    annotations: list, images: _ImageTable, known_cats: set[int], where: str
) -> tuple[list[list[list[float]]], list[list[int]], CleaningStats]:
    """Per image (in ``images`` order): the kept xyxy boxes and their category ids, and the counts
    of what was removed or clamped. Crowd boxes are removed, boxes clamped to the image, empty ones dropped."""
    stats = CleaningStats()
    boxes: list[list[list[float]]] = [[] for _ in images.ids]
    cats: list[list[int]] = [[] for _ in images.ids]
    for ann in annotations:
        try:
            iid, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
            x, y, bw, bh = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{where}: annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r} needs "
                "'image_id', 'category_id' and a 4-number 'bbox' [x, y, width, height]."
            ) from None
        if ann.get("iscrowd", 0):
            stats.crowd_removed += 1
            continue
        _require(
            iid in images.index_of,
            f"{where}: annotation {ann.get('id', '?')} points at image id {iid}, which is not in 'images'.",
        )
        _require(
            cid in known_cats,
            f"{where}: annotation {ann.get('id', '?')} has category id {cid}, which is not in 'categories'.",
        )
        if bw < 0 or bh < 0:
            stats.negative_size += 1
            stats.first_negative = stats.first_negative or f"annotation {ann.get('id', '?')}, bbox {list(bbox)}"
        i = images.index_of[iid]
        box = _clamp_box(x, y, x + bw, y + bh, images.widths[i], images.heights[i], stats)
        if box is not None:
            boxes[i].append(box)
            cats[i].append(cid)
    return boxes, cats, stats


def _clamp_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int, stats: CleaningStats) -> list[float] | None:
    """The xyxy box clamped to [0, w] x [0, h] (counted when it changes), None when it is empty."""
    cx0, cy0 = min(max(x0, 0.0), w), min(max(y0, 0.0), h)
    cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        stats.boxes_clamped += 1
    if cx1 <= cx0 or cy1 <= cy0:
        stats.degenerate_dropped += 1
        return None
    return [cx0, cy0, cx1, cy1]


def _pack(name: str, annotation_file: Path, image_dir: Path, images: _ImageTable, boxes: list, cats: list,
          data: dict, stats: CleaningStats, keep_raw: bool) -> CocoSplit:
    """Flat arrays: image i's objects are rows offsets[i]:offsets[i+1] of boxes_xyxy/category_ids."""
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return CocoSplit(
        name=name,
        annotation_file=annotation_file,
        image_dir=image_dir,
        image_ids=np.asarray(images.ids, dtype=np.int64),
        file_names=images.file_names,
        heights=np.asarray(images.heights, dtype=np.int64),
        widths=np.asarray(images.widths, dtype=np.int64),
        offsets=offsets,
        boxes_xyxy=np.asarray([b for per_image in boxes for b in per_image], dtype=np.float32).reshape(-1, 4),
        category_ids=np.asarray([c for per_image in cats for c in per_image], dtype=np.int64),
        categories=data["categories"],
        stats=stats,
        raw=data if keep_raw else None,
    )


def coco_api_from_dict(data: dict):
    """A pycocotools ``COCO`` built from an already parsed dict, without its progress prints."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class LabelMapping:
    """Maps COCO category ids to classifier indices and back.

    ``raw``: the index is the category id itself, so the classifier is max id + 1 wide and unused
    indices are named "N/A" (the official DETR/DAC-DETR COCO setting: 91 classes).
    ``contiguous``: categories sorted by id get indices 0..K-1 (detrex/MMDetection style).
    """

    def __init__(self, categories: list[dict], mode: str = "raw", source: str = "the annotation file") -> None:
        if mode not in LABEL_MAPPINGS:
            raise DataError(f"label_mapping must be one of {LABEL_MAPPINGS}, got {mode!r}.")
        cats = sorted(categories, key=lambda c: c["id"])
        ids = [c["id"] for c in cats]
        names = [str(c.get("name", c["id"])) for c in cats]
        self.mode = mode
        if mode == "raw":
            if ids[0] < 0:
                raise DataError(
                    f"label_mapping=raw uses category ids as class indices, but {source} has negative "
                    f"category id(s) {[i for i in ids if i < 0]}. Use `data.label_mapping=contiguous`."
                )
            if ids[-1] > MAX_RAW_CATEGORY_ID:
                raise DataError(
                    f"label_mapping=raw would make a classifier with {ids[-1] + 1} outputs for "
                    f"{len(ids)} categories in {source} (largest id {ids[-1]}). Use "
                    "`data.label_mapping=contiguous`."
                )
            self.num_classes = ids[-1] + 1
            self.class_names = ["N/A"] * self.num_classes
            for i, n in zip(ids, names):
                self.class_names[i] = n
            self._label_to_cat = list(range(self.num_classes))
            self._cat_to_label = {i: i for i in ids}
        else:
            self.num_classes = len(ids)
            self.class_names = names
            self._label_to_cat = ids
            self._cat_to_label = {cid: label for label, cid in enumerate(ids)}
        self.category_ids = ids

    def label_to_category_id(self, label: int) -> int:
        return self._label_to_cat[int(label)]

    def labels_of(self, category_ids: np.ndarray) -> np.ndarray:
        return np.asarray([self._cat_to_label[int(c)] for c in category_ids], dtype=np.int64)


def _decode_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB, decoded with PIL as the official code does (raw pixel orientation,
    EXIF rotation ignored, which is what COCO-style annotations refer to)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"The image file {path} does not exist (it did when the data set was set up).") from None
    except Exception as e:  # PIL raises many types for damaged files
        raise DataError(f"The image file {path} cannot be decoded ({e}); it is probably truncated or corrupt.") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CocoDetection(Dataset):
    """Images and targets of one cleaned split, passed through ``transforms``.

    Returns ``(image, target)``: image float32 (3, H, W) as the transforms leave it, target a dict
    with ``labels`` int64 (N,), ``boxes`` float32 (N, 4) normalised cxcywh, ``image_id`` int64 0-d,
    ``orig_size`` int64 (2,) = (h, w) of the file and ``size`` int64 (2,) = (h, w) after the
    transforms. ``transforms`` takes and returns ``(tv_tensors.Image, {"boxes": BoundingBoxes
    (XYXY), "labels"})`` and must end with ``ToNormalizedCxcywh``.
    """

    def __init__(self, split: CocoSplit, labels: LabelMapping, transforms: Callable) -> None:
        self.split = split
        self.transforms = transforms
        self.labels = labels.labels_of(split.category_ids)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from torchvision import tv_tensors

        s = self.split
        path = s.image_dir / s.file_names[index]
        image = _decode_image(path)
        h, w = int(s.heights[index]), int(s.widths[index])
        if tuple(image.shape[-2:]) != (h, w):
            raise DataError(
                f"The image file {path} is {image.shape[-1]}x{image.shape[-2]} (w x h) but "
                f"{s.annotation_file} says {w}x{h}; its boxes would not fit the pixels. Fix the "
                "'width'/'height' of this image in the annotation file (or re-export the images)."
            )
        lo, hi = s.offsets[index], s.offsets[index + 1]
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(s.boxes_xyxy[lo:hi].copy()), format="XYXY", canvas_size=(h, w)
        )
        target = {"boxes": boxes, "labels": torch.from_numpy(self.labels[lo:hi].copy())}
        image, target = self.transforms(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), {
            "labels": target["labels"],
            "boxes": target["boxes"],
            "image_id": torch.tensor(int(s.image_ids[index]), dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": target["size"],
        }
