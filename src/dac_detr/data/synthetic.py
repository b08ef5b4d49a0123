"""A synthetic COCO-format detection data set: coloured shapes on cluttered backgrounds.

Six classes, each with its own shape and its own colour (so a detector must use both), drawn at
sizes that fall into COCO's small (< 32² px), medium and large (> 96² px) area ranges where the
image size allows, overlapping and partly occluding each other (every object keeps at least 60%
of its pixels visible; its box is the box of its visible pixels), on backgrounds of gradients,
smooth noise and thin grey lines, which are unsaturated so they do not look like the objects.
About 5% of the images have no objects. Generation is deterministic for a seed: image i of a
split depends only on (seed, split, i).

Command line::

    python -m dac_detr.data.synthetic OUT_DIR --train 1500 --val 100 --image-size 128 --seed 0 [--classes 3]

writes ``OUT_DIR/{train2017,val2017}/*.jpg`` and ``OUT_DIR/annotations/instances_{train,val}2017.json``.
``ensure_synthetic_coco()`` does the same into a cache folder on first use and reuses it after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump when the generated content changes, so cached copies from older versions are not reused.
GENERATOR_VERSION = 3

# (name, RGB): saturated, well-separated hues; the clutter is nearly grey.
CLASSES = (
    ("square", (215, 45, 45)),
    ("disc", (45, 175, 65)),
    ("triangle", (50, 90, 225)),
    ("ring", (235, 195, 35)),
    ("cross", (195, 55, 205)),
    ("bar", (35, 195, 205)),
)
SPLIT_IDS = {"train": 0, "val": 1}
MIN_VISIBLE_FRACTION = 0.6
EMPTY_IMAGE_FRACTION = 0.05
# Share of objects drawn from COCO's small / medium / large ranges (when the image allows all three).
SIZE_MIX = {"small": 0.25, "medium": 0.6, "large": 0.15}

DEFAULTS = {"num_train": 1500, "num_val": 100, "image_size": 128, "seed": 0, "max_objects": 4, "small_fraction": None}


def size_mix(ranges: dict[str, tuple[int, int]], small_fraction: float | None = None) -> np.ndarray:
    """Probability of each of ``ranges``' area ranges (in its order) for one object's size.

    ``small_fraction=None`` keeps ``SIZE_MIX``; a number gives the small range that share and
    splits the rest between the other ranges in ``SIZE_MIX``'s proportions (a harder set).
    """
    weights = {name: SIZE_MIX[name] for name in ranges}
    if small_fraction is not None and "small" in weights and len(weights) > 1:
        rest = sum(w for name, w in weights.items() if name != "small")
        weights = {name: (small_fraction if name == "small" else (1 - small_fraction) * w / rest) for name, w in weights.items()}
    mix = np.array(list(weights.values()), dtype=np.float64)
    return mix / mix.sum()


def size_ranges(image_size: int) -> dict[str, tuple[int, int]]:
    """Object side length ranges (pixels) per COCO area range that fit in an image of this size.

    A square object of side s has area s², so sides < 32 are COCO "small", 32..95 "medium" and
    >= 97 "large". Ranges that do not fit the image are left out.
    """
    # The smallest objects span about 1.5 cells of a stride-8 feature map: still detectable by a
    # small model trained for minutes.
    lo = max(8, round(0.1 * image_size))
    ranges = {
        "small": (lo, min(31, int(0.75 * image_size))),
        "medium": (32, min(95, int(0.75 * image_size))),
        "large": (97, int(0.9 * image_size)),
    }
    return {k: v for k, v in ranges.items() if v[0] <= v[1]}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 clutter: gradient + smooth noise + thin grey lines, low saturation."""
    from PIL import Image, ImageDraw

    def greyish() -> np.ndarray:
        return rng.uniform(70, 190) + rng.uniform(-12, 12, 3)

    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) * 0.5 + 0.5
    image = greyish()[None, None] * (1 - t[..., None]) + greyish()[None, None] * t[..., None]

    coarse = max(2, size // 8)
    noise = rng.normal(0, 1, (coarse, coarse)).astype(np.float32)
    noise = np.asarray(Image.fromarray(noise, mode="F").resize((size, size), Image.BILINEAR))
    image = image + 18 * noise[..., None]

    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(c) for c in np.clip(greyish(), 0, 255)), width=int(rng.integers(1, 3)))
    return np.asarray(canvas, dtype=np.float32)


def _shape_mask(kind: str, size: int, x0: int, y0: int, w: int, h: int, variant: int) -> np.ndarray:
    """(size, size) bool mask of one shape whose full extent is the box (x0, y0, w, h)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + w - 1, y0 + h - 1
    if kind in ("square", "bar"):
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif kind == "disc":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif kind == "ring":
        draw.ellipse([x0, y0, x1, y1], outline=255, width=max(2, round(0.2 * w)))
    elif kind == "triangle":
        cx = (x0 + x1) / 2
        points = [(cx, y0), (x0, y1), (x1, y1)] if variant == 0 else [(x0, y0), (x1, y0), (cx, y1)]
        draw.polygon(points, fill=255)
    elif kind == "cross":
        t = max(2, round(0.32 * w))
        cx, cy = x0 + (w - t) // 2, y0 + (h - t) // 2
        draw.rectangle([x0, cy, x1, cy + t - 1], fill=255)
        draw.rectangle([cx, y0, cx + t - 1, y1], fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(mask) > 0


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    """Whether two (x0, y0, x1, y1) boxes overlap once each is grown by ``margin`` pixels."""
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def render_image(
    rng: np.random.Generator, size: int, max_objects: int = 4, small_fraction: float | None = None,
    num_classes: int = len(CLASSES),
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image: (size, size, 3) uint8 and a list of (category id, [x, y, w, h] of the visible pixels).

    Objects are drawn from the first ``num_classes`` classes (fewer classes: a set to fine-tune on).
    """
    image = _background(rng, size)
    num_objects = 0 if rng.random() < EMPTY_IMAGE_FRACTION else int(rng.integers(1, max_objects + 1))
    ranges = size_ranges(size)
    names = list(ranges)
    mix = size_mix(ranges, small_fraction)
    shortest = min(r[0] for r in ranges.values())
    plans = []
    for _ in range(num_objects):
        cls = int(rng.integers(num_classes))
        lo, hi = ranges[names[int(rng.choice(len(names), p=mix))]]
        side = int(rng.integers(lo, hi + 1))
        w = h = side
        if CLASSES[cls][0] == "bar":  # a long thin rectangle, horizontal or vertical, >= 4 px thick
            side = min(max(side, 2 * shortest), size)
            thin = max(4, round(side * rng.uniform(0.22, 0.32)))
            w, h = (side, thin) if rng.random() < 0.5 else (thin, side)
        plans.append((cls, w, h, int(rng.integers(2))))
    plans.sort(key=lambda p: -p[1] * p[2])  # large ones at the back, so small ones stay visible

    placed: list[dict] = []  # cls, full-pixel count, visible mask, colour
    for cls, w, h, variant in plans:
        for _attempt in range(40):
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            # Two objects of one class must not touch: same shape and colour would merge into one blob.
            if any(p["cls"] == cls and _boxes_touch(p["box"], box, margin=2) for p in placed):
                continue
            mask = _shape_mask(CLASSES[cls][0], size, x0, y0, w, h, variant)
            if all((p["visible"] & ~mask).sum() >= MIN_VISIBLE_FRACTION * p["area"] for p in placed):
                break
        else:
            continue  # no place keeps every earlier object visible enough: leave this one out
        for p in placed:
            p["visible"] &= ~mask
        colour = np.clip(np.array(CLASSES[cls][1]) + rng.integers(-20, 21, 3), 0, 255)
        placed.append({"cls": cls, "box": box, "area": int(mask.sum()), "visible": mask, "colour": colour})

    annotations = []
    for p in placed:
        image[p["visible"]] = p["colour"]
        ys, xs = np.nonzero(p["visible"])
        x, y = int(xs.min()), int(ys.min())
        annotations.append((p["cls"] + 1, [float(x), float(y), float(xs.max() - x + 1), float(ys.max() - y + 1)]))
    image = image + rng.normal(0, 4, image.shape)  # sensor-like noise over everything
    return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations


def write_split(
    out_dir: Path, split: str, num_images: int, image_size: int, seed: int, max_objects: int,
    small_fraction: float | None = None, num_classes: int = len(CLASSES),
) -> None:
    """Write ``out_dir/{split}2017/*.jpg`` and ``out_dir/annotations/instances_{split}2017.json``."""
    from PIL import Image

    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        pixels, objects = render_image(rng, image_size, max_objects, small_fraction, num_classes)
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        # 4:4:4 chroma keeps the colours of small objects crisp.
        Image.fromarray(pixels).save(image_dir / file_name, quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for category_id, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": f"dac-detr synthetic shapes, {split}, seed {seed}", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, (name, _) in enumerate(CLASSES[:num_classes])],
    }
    with (out_dir / "annotations" / f"instances_{split}2017.json").open("w") as f:
        json.dump(data, f)


def _check_args(num_train: int, num_val: int, image_size: int, max_objects: int, small_fraction: float | None = None,
                num_classes: int = len(CLASSES)) -> None:
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"The synthetic set has 1 to {len(CLASSES)} classes, got num_classes={num_classes}.")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"The synthetic set needs at least one train and one val image, got {num_train} and {num_val}.")
    if image_size < 32:
        raise ValueError(f"The synthetic image size must be at least 32 px, got {image_size}.")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}.")
    if small_fraction is not None and not 0.0 <= small_fraction <= 1.0:
        raise ValueError(f"small_fraction must be between 0 and 1 (or null for the default mix), got {small_fraction}.")


def generate_synthetic_coco(
    out_dir: str | os.PathLike,
    num_train: int = DEFAULTS["num_train"],
    num_val: int = DEFAULTS["num_val"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    max_objects: int = DEFAULTS["max_objects"],
    small_fraction: float | None = DEFAULTS["small_fraction"],
    num_classes: int = len(CLASSES),
) -> Path:
    """Write the data set into ``out_dir`` atomically: into a temporary sibling, then one rename.

    ``out_dir`` must not exist yet (or be empty). An interrupted run leaves only a temporary
    folder behind, never a half-written ``out_dir``. Returns ``out_dir``.
    """
    _check_args(num_train, num_val, image_size, max_objects, small_fraction, num_classes)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another folder or delete it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_split(tmp, "train", num_train, image_size, seed, max_objects, small_fraction, num_classes)
        write_split(tmp, "val", num_val, image_size, seed, max_objects, small_fraction, num_classes)
        params = {"generator_version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
                  "image_size": image_size, "seed": seed, "max_objects": max_objects, "small_fraction": small_fraction,
                  "num_classes": num_classes}
        (tmp / "synthetic.json").write_text(json.dumps(params, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_cache_dir() -> Path:
    """``$DAC_DETR_DATA``, else ``$XDG_CACHE_HOME/dac_detr``, else ``~/.cache/dac_detr``."""
    if os.environ.get("DAC_DETR_DATA"):
        return Path(os.environ["DAC_DETR_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dac_detr"


def synthetic_folder_name(
    num_train: int, num_val: int, image_size: int, seed: int, max_objects: int, small_fraction: float | None = None
) -> str:
    name = f"synthetic-coco-v{GENERATOR_VERSION}-s{image_size}-train{num_train}-val{num_val}-obj{max_objects}-seed{seed}"
    return name if small_fraction is None else f"{name}-small{small_fraction:g}"


def ensure_synthetic_coco(
    root: str | os.PathLike | None = None,
    num_train: int = DEFAULTS["num_train"],
    num_val: int = DEFAULTS["num_val"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    max_objects: int = DEFAULTS["max_objects"],
    small_fraction: float | None = DEFAULTS["small_fraction"],
) -> Path:
    """The synthetic data set's folder, generated on first use and reused afterwards.

    ``root=None`` puts it in ``default_cache_dir()/<name that encodes the parameters>``. A folder
    exists only once generation has finished (atomic rename), so an interrupted generation is
    never reused; when several processes race, the first rename wins and the others reuse it.
    """
    _check_args(num_train, num_val, image_size, max_objects, small_fraction)
    folder = Path(root).expanduser() if root is not None else default_cache_dir() / synthetic_folder_name(
        num_train, num_val, image_size, seed, max_objects, small_fraction
    )
    if (folder / "annotations" / "instances_val2017.json").is_file():
        return folder
    log.info("Generating the synthetic data set (%d train / %d val images of %d px) in %s", num_train, num_val, image_size, folder)
    try:
        return generate_synthetic_coco(folder, num_train, num_val, image_size, seed, max_objects, small_fraction)
    except (FileExistsError, OSError):
        if (folder / "annotations" / "instances_val2017.json").is_file():
            return folder  # another process finished first
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dac_detr.data.synthetic",
        description="Write the synthetic shapes data set in COCO format (train2017/, val2017/, annotations/).",
    )
    parser.add_argument("out_dir", help="folder to create (must not exist or be empty)")
    parser.add_argument("--train", type=int, default=DEFAULTS["num_train"], help="number of training images")
    parser.add_argument("--val", type=int, default=DEFAULTS["num_val"], help="number of validation images")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="image side in pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--max-objects", type=int, default=DEFAULTS["max_objects"], help="most objects per image")
    parser.add_argument("--small-fraction", type=float, default=None, help="share of COCO-small objects (default: the built-in mix)")
    parser.add_argument("--classes", type=int, default=len(CLASSES),
                        help=f"number of classes, the first N of {', '.join(n for n, _ in CLASSES)}")
    args = parser.parse_args(argv)
    try:
        out = generate_synthetic_coco(
            args.out_dir, args.train, args.val, args.image_size, args.seed, args.max_objects, args.small_fraction,
            args.classes,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.train} train and {args.val} val images ({args.classes} classes) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
