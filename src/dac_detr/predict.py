"""Detect objects in images: `python -m dac_detr.predict ckpt=PATH images=DIR out=DIR`
(``ckpt=model.onnx``: an ONNX export, run with onnxruntime; ``model=FILE`` is the same as ``ckpt=FILE``).

One inference pipeline: images are decoded, resized, normalised and padded by the validation
transforms and the collate of the training run's data module (the ones evaluation uses), and the
detector's outputs go through the same ``PostProcess``; a PyTorch checkpoint and its ONNX export
give the same detections.

Writes ``out/detections.json`` (one entry per box: file name, image size, category id, class name,
score, [x, y, w, h] in pixels of the original image) and, with ``draw=true``, a copy of every image
with its boxes drawn. Inputs are never written over; an image that cannot be decoded is reported
by name and skipped (``strict=true``: the run stops there), and the detections of the images read
so far are written in every case.
"""

from __future__ import annotations

import glob
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .data.errors import DataError
from .utils.config_checks import ConfigError
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
        raise DataError(
            f"images={images}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))}). "
            "Give a folder, an image file or a glob such as 'photos/*.jpg'."
        )
    return files


def drawing_paths(files: list[Path], out_dir: Path) -> dict[Path, Path]:
    """Where each input's drawing goes: ``out/<name>`` (.jpg stays JPEG, other formats -> .png).

    Two inputs that would share a drawing name keep their full names (``a.bmp.png``). An output
    path that is an input file, or ``out`` being the images' folder, is a ConfigError: predict
    never writes over an input.
    """
    resolved_inputs = {p.resolve() for p in files}
    out_resolved = out_dir.resolve()
    if any(p.parent == out_resolved for p in resolved_inputs):
        raise ConfigError(
            f"out={out_dir} holds input images: predict would write its drawings and detections.json next to (or over) "
            "them. Choose another folder, e.g. out=predictions/."
        )
    names = [p.stem + (".jpg" if p.suffix.lower() in (".jpg", ".jpeg") else ".png") for p in files]
    paths = {}
    for p, name in zip(files, names):
        if names.count(name) > 1:
            name = p.name + (".jpg" if p.suffix.lower() in (".jpg", ".jpeg") else ".png")
        target = out_dir / name
        if target.resolve() in resolved_inputs:
            raise ConfigError(f"the drawing of {p} would overwrite the input {target}; choose another out= folder.")
        paths[p] = target
    return paths


def decode_image(path: Path) -> Tensor:
    """uint8 (3, H, W) RGB, decoded exactly as the data sets decode (PIL, EXIF rotation ignored).
    Raises DataError naming the file when it cannot be decoded."""
    from .data.coco import _decode_image

    return _decode_image(path)


@dataclass
class Source:
    """What predict runs: ``run(images, pixel_mask, orig_sizes) -> {pred_logits, pred_boxes[, scores,
    labels, boxes]}``, plus the training run's config, classes and category ids."""

    run: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]
    config: dict[str, Any]
    class_names: list[str]
    category_ids: list[int]
    graph_postprocess: Optional[dict[str, Any]]
    description: str


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytorch_source(ckpt: str, device_name: str = "auto") -> Source:
    """A training checkpoint or a ``format=pth`` export (the stored weights: EMA when trained with EMA)."""
    from .deploy.inference_model import load_inference_model

    loaded = load_inference_model(ckpt, use_ema=True)
    device = _device(device_name)
    model = loaded.model.to(device).eval()

    def run(images: Tensor, pixel_mask: Tensor, orig_sizes: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            out = model(images.to(device), pixel_mask.to(device))
        return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}

    return Source(run, loaded.config, loaded.class_names, loaded.category_ids, None, f"PyTorch ({device})")


def onnx_source(path: str, device_name: str = "auto", threads: int = 0) -> Source:
    """An ONNX export run with onnxruntime (CUDA provider when available and device != cpu)."""
    from .deploy.onnx_runtime import OnnxDetector

    detector = OnnxDetector(path, device="cpu" if device_name == "cpu" else "auto", threads=threads)
    meta = detector.metadata
    label_map = meta.get("label_to_category_id") or {}
    category_ids = [int(label_map[str(i)]) for i in range(len(meta["class_names"]))]
    return Source(detector, meta["config"], list(meta["class_names"]), category_ids, detector.postprocess,
                  f"onnxruntime ({', '.join(detector.providers)})")


def inference_inputs(data_cfg: dict[str, Any], size: Optional[int] = None, max_size: Optional[int] = None):
    """(val transforms, collate) of the training run's data module; ``size``/``max_size`` replace its
    evaluation sizes when given."""
    from .data.transforms import build_val_transforms

    datamodule = instantiate(OmegaConf.create(data_cfg))
    transforms, collate = datamodule.val_transforms, datamodule.collate
    if size is not None or max_size is not None:
        transforms = build_val_transforms(int(size or data_cfg.get("val_size", 800)),
                                          int(max_size or data_cfg.get("val_max_size", 1333)))
    return transforms, collate


def prepare(path: Path, transforms: Callable) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(uint8 original (3, h, w), transformed image, target with ``orig_size`` and ``size``), as a data
    set item with no boxes."""
    from torchvision import tv_tensors

    original = decode_image(path)
    h, w = original.shape[-2:]
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
              "labels": torch.zeros(0, dtype=torch.int64)}
    image, target = transforms(tv_tensors.Image(original), target)
    return original, image.as_subclass(Tensor), {**target, "orig_size": torch.tensor([h, w], dtype=torch.int64)}


def detections_of(source: Source, outputs: dict[str, Tensor], orig_sizes: Tensor, postprocess) -> list[dict[str, Tensor]]:
    """Per-image ``{scores, labels (class index), boxes xyxy}`` from the model's outputs: the graph's own
    post-processing when it has one and no other is asked for, else ``postprocess`` on the raw outputs."""
    if postprocess is None and source.graph_postprocess is not None and "scores" in outputs:
        to_label = {c: i for i, c in enumerate(source.category_ids)}
        result = []
        for scores, categories, boxes in zip(outputs["scores"], outputs["labels"], outputs["boxes"]):
            keep = categories >= 0  # -1: padding of the in-graph NMS
            labels = torch.tensor([to_label[int(c)] for c in categories[keep].tolist()], dtype=torch.int64)
            result.append({"scores": scores[keep], "labels": labels, "boxes": boxes[keep]})
        return result
    return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes.to(outputs["pred_logits"].device))


def _postprocess_module(cfg: DictConfig, source: Source):
    """The PostProcess of predict: ``postprocess=`` from the command line, else (no in-graph one) the run's."""
    if cfg.get("postprocess"):
        pp_cfg = OmegaConf.create(OmegaConf.to_container(cfg.postprocess, resolve=True)) if isinstance(
            cfg.postprocess, DictConfig) else OmegaConf.create({"method": str(cfg.postprocess)})
        if "_target_" not in pp_cfg:
            base = OmegaConf.create(source.config.get("postprocess") or {"_target_": "dac_detr.evaluation.PostProcess"})
            if base.get("method") != pp_cfg.get("method", base.get("method")):
                base = OmegaConf.create({"_target_": base._target_})
            pp_cfg = OmegaConf.merge(base, pp_cfg)
        return instantiate(pp_cfg)
    if source.graph_postprocess is not None:
        return None
    return instantiate(OmegaConf.create(source.config["postprocess"]))


@task_wrapper
def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run predict; returns the detections written to ``out/detections.json``."""
    model_path = cfg.ckpt  # a checkpoint, a .pt export or an .onnx export
    if str(model_path).lower().endswith(".onnx"):
        source = onnx_source(str(model_path), str(cfg.device), int(cfg.get("threads") or 0))
    else:
        source = pytorch_source(str(model_path), str(cfg.device))
    files = list_images(str(cfg.images))
    out_dir = Path(cfg.out).expanduser()
    drawings = drawing_paths(files, out_dir)  # checks that no output lands on an input, drawn or not
    if not cfg.draw:
        drawings = {}
    postprocess = _postprocess_module(cfg, source)
    transforms, collate = inference_inputs(source.config["data"], cfg.get("size"), cfg.get("max_size"))
    log.info("predict: %d images with %s", len(files), source.description)

    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    done = 0
    batch_size = max(1, int(cfg.batch_size))
    try:
        pending: list[tuple[Path, Tensor, Tensor, dict]] = []
        for index, path in enumerate(files):
            try:
                pending.append((path, *prepare(path, transforms)))
            except DataError as err:
                if cfg.get("strict"):
                    raise
                log.warning("Skipped %s: %s", path.name, err)
                skipped.append({"file_name": path.name, "error": str(err)})
            if len(pending) == batch_size or (index == len(files) - 1 and pending):
                results += _run_batch(source, pending, collate, postprocess, cfg, drawings)
                done += len(pending)
                pending = []
    finally:
        json_path = out_dir / "detections.json"
        json_path.write_text(json.dumps(results, indent=1))
        if skipped:
            (out_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
        extra = f"; skipped {len(skipped)} unreadable: {', '.join(s['file_name'] for s in skipped)}" if skipped else ""
        print(f"Wrote {len(results)} detections for {done} images to {json_path}{extra}", flush=True)
    return results


def _run_batch(source: Source, batch: list, collate: Callable, postprocess, cfg: DictConfig,
               drawings: dict[Path, Path]) -> list[dict[str, Any]]:
    from .deploy.drawing import draw_detections, save_drawing

    paths = [item[0] for item in batch]
    originals = [item[1] for item in batch]
    images, pixel_mask, targets = collate([(item[2], item[3]) for item in batch])
    orig_sizes = torch.stack([t["orig_size"] for t in targets])
    outputs = source.run(images, pixel_mask, orig_sizes)
    detections = detections_of(source, outputs, orig_sizes, postprocess)
    rows = []
    for path, original, det in zip(paths, originals, detections):
        keep = det["scores"] >= float(cfg.score_threshold)
        scores, labels, boxes = det["scores"][keep], det["labels"][keep], det["boxes"][keep]
        order = torch.argsort(scores, descending=True, stable=True)[: int(cfg.max_detections)]
        scores, labels, boxes = scores[order].cpu(), labels[order].cpu(), boxes[order].float().cpu()
        names = [source.class_names[l] if l < len(source.class_names) else str(l) for l in labels.tolist()]
        for score, label, name, box in zip(scores.tolist(), labels.tolist(), names, boxes.tolist()):
            rows.append({
                "file_name": path.name,
                "height": int(original.shape[1]),
                "width": int(original.shape[2]),
                "category_id": int(source.category_ids[label]) if label < len(source.category_ids) else int(label),
                "label": int(label),
                "class_name": name,
                "score": float(score),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            })
        if path in drawings:
            save_drawing(draw_detections(original, boxes, labels.tolist(), names, scores.tolist()), drawings[path])
    return rows


def model_file_alias(args: list[str]) -> list[str]:
    """``model=FILE`` (the form deployment guides use) means ``ckpt=FILE``.

    predict reads the detector from the file, so unlike train it has no ``model`` config group for
    Hydra to choose from; without this, ``model=model.onnx`` ends in Hydra's "Could not override
    'model'". Giving both is ambiguous and refused with the fix.
    """
    if not any(a.startswith("model=") for a in args):
        return list(args)
    if any(a.startswith("ckpt=") for a in args):
        raise ValueError("predict got both model= and ckpt=; give the checkpoint or ONNX file once, as ckpt=FILE.")
    return [f"ckpt={a[len('model='):]}" if a.startswith("model=") else a for a in args]


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    """The command line (``python -m dac_detr.predict``, ``dac-detr-predict``)."""
    try:
        sys.argv[1:] = model_file_alias(sys.argv[1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    _hydra_main()


if __name__ == "__main__":
    main()
