"""Detect objects in images: `python -m dac_detr.predict ckpt=PATH images=DIR out=DIR`.

Writes ``out/detections.json`` (one entry per box: file name, image size, category id, class name,
score, [x, y, w, h] in pixels of the original image) and, with ``draw=true``, a copy of every image
with its boxes drawn.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .module import IMAGENET_MEAN, IMAGENET_STD
from .utils.checkpoint import (
    CheckpointError,
    checkpoint_metadata,
    detector_state_dict,
    load_checkpoint_file,
    load_detector_weights,
    without_pretrained_download,
)
from .utils.instantiate import build_detector
from .utils.task import task_wrapper

log = logging.getLogger("dac_detr")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(images: str) -> list[Path]:
    """Image files of a folder (sorted), a single file, or a glob pattern."""
    path = Path(images).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"images={images}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))}). "
            "Give a folder, an image file or a glob such as 'photos/*.jpg'."
        )
    return files


def load_image(path: Path) -> Tensor:
    """uint8 (3, H, W) RGB."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(str(path), mode=ImageReadMode.RGB)


def preprocess(image: Tensor, size: int, max_size: int | None) -> Tensor:
    """uint8 (3, H, W) -> float (3, h, w) resized as the validation transform does, ImageNet-normalised."""
    from torchvision.transforms.v2 import functional as F

    from .data.transforms import detr_resize_size

    h, w = detr_resize_size(int(image.shape[1]), int(image.shape[2]), size, max_size)
    resized = F.resize(image, [h, w], antialias=True).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (resized - mean) / std


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@task_wrapper
def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    checkpoint = load_checkpoint_file(cfg.ckpt)
    metadata = checkpoint_metadata(checkpoint)
    train_cfg = metadata.get("config")
    if not train_cfg:
        raise CheckpointError(
            f"{cfg.ckpt} carries no training config, so predict cannot rebuild the detector: use a checkpoint "
            "written by dac_detr.train or dac_detr.export (for an official checkpoint, use dac_detr.evaluate)."
        )
    train_cfg = OmegaConf.create(train_cfg)
    without_pretrained_download(train_cfg)
    class_names = list(metadata.get("class_names") or [])
    category_ids = list(metadata.get("category_ids") or range(len(class_names)))
    num_classes = len(class_names)

    device = _device(cfg.device)
    model = build_detector(train_cfg, num_classes)
    load_detector_weights(model, detector_state_dict(checkpoint), str(cfg.ckpt))
    model.to(device).eval()
    pp_cfg = cfg.postprocess if cfg.get("postprocess") else train_cfg.postprocess
    if "_target_" not in pp_cfg:
        pp_cfg = OmegaConf.merge(train_cfg.postprocess, pp_cfg)
    postprocess = instantiate(pp_cfg)
    size = int(cfg.size or train_cfg.data.get("val_size", 800))
    max_size = cfg.max_size if cfg.max_size is not None else train_cfg.data.get("val_max_size")

    files = list_images(str(cfg.images))
    out_dir = Path(cfg.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), int(cfg.batch_size)):
        chunk = files[start : start + int(cfg.batch_size)]
        originals = [load_image(p) for p in chunk]
        inputs = [preprocess(img, size, max_size) for img in originals]
        height = max(x.shape[1] for x in inputs)
        width = max(x.shape[2] for x in inputs)
        images = torch.zeros(len(inputs), 3, height, width)
        pixel_mask = torch.ones(len(inputs), height, width, dtype=torch.bool)  # True on padding
        for i, x in enumerate(inputs):
            images[i, :, : x.shape[1], : x.shape[2]] = x
            pixel_mask[i, : x.shape[1], : x.shape[2]] = False
        orig_sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in originals], device=device)
        with torch.no_grad():
            outputs = model(images.to(device), pixel_mask.to(device))
            detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)
        for path, original, det in zip(chunk, originals, detections):
            keep = det["scores"] >= float(cfg.score_threshold)
            scores, labels, boxes = det["scores"][keep], det["labels"][keep], det["boxes"][keep]
            order = scores.argsort(descending=True)[: int(cfg.max_detections)]
            scores, labels, boxes = scores[order].cpu(), labels[order].cpu(), boxes[order].float().cpu()
            for score, label, box in zip(scores.tolist(), labels.tolist(), boxes.tolist()):
                results.append(
                    {
                        "file_name": path.name,
                        "height": int(original.shape[1]),
                        "width": int(original.shape[2]),
                        "category_id": int(category_ids[label]) if label < len(category_ids) else int(label),
                        "label": int(label),
                        "class_name": class_names[label] if label < len(class_names) else str(label),
                        "score": float(score),
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    }
                )
            if cfg.draw:
                _draw(original, boxes, labels, scores, class_names, out_dir / path.name)
    json_path = out_dir / "detections.json"
    json_path.write_text(json.dumps(results, indent=1))
    log.info("%d detections in %d images -> %s", len(results), len(files), json_path)
    print(f"Wrote {len(results)} detections for {len(files)} images to {json_path}", flush=True)
    return results


def _draw(image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor, class_names: list[str], path: Path) -> None:
    from torchvision.io import write_jpeg, write_png
    from torchvision.utils import draw_bounding_boxes

    names = [f"{class_names[l] if l < len(class_names) else l} {s:.2f}" for l, s in zip(labels.tolist(), scores.tolist())]
    drawn = draw_bounding_boxes(image, boxes, labels=names, colors="red", width=2) if len(boxes) else image
    if path.suffix.lower() in (".jpg", ".jpeg"):
        write_jpeg(drawn, str(path), quality=95)
    else:
        write_png(drawn, str(path.with_suffix(".png")))


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
