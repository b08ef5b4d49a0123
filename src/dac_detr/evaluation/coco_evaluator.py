"""COCO box AP with pycocotools' COCOeval (the reference) or faster-coco-eval (same numbers, faster).

Under DDP every process calls ``update`` for the images it saw; ``compute`` all-gathers the
detections once, evaluates on rank 0 and broadcasts the metrics, so every rank returns the same
dict (and only rank 0 spends the CPU time). Images that Lightning's DistributedSampler repeats to
even out the ranks are counted once. ``format_coco_table`` writes the table printed at the end
of a validation (COCOeval's summary, per-class AP, queries per object).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

BACKENDS = ("pycocotools", "faster_coco_eval")
# COCOeval's summary order: stats[i] is the metric named METRIC_NAMES[i].
METRIC_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100")


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CocoEvaluator:
    """Accumulates detections over an evaluation pass and computes COCO box metrics.

    Args:
        coco_gt: the pycocotools ``COCO`` object of the split (``datamodule.coco_gt("val")``).
        label_to_category_id: class index -> COCO category id, as a callable
            (``datamodule.label_to_category_id``), a mapping or a sequence.
        backend: ``pycocotools`` or ``faster_coco_eval`` (imported only when chosen).

    Only images passed to ``update`` are evaluated (COCOeval ``params.imgIds``), so a shortened
    validation run gives the metrics of the images it saw; an image with no detections still
    counts its objects as missed.
    """

    def __init__(
        self,
        coco_gt,
        label_to_category_id: Callable[[int], int] | Mapping[int, int] | Sequence[int],
        backend: str = "pycocotools",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"COCO evaluation backend must be one of {BACKENDS}, got {backend!r}.")
        if backend == "faster_coco_eval":
            try:
                import faster_coco_eval  # noqa: F401
            except ImportError:
                raise ImportError(
                    "backend='faster_coco_eval' needs the faster-coco-eval package: "
                    "`pip install 'dac-detr[fast-eval]'` (or use backend='pycocotools')."
                ) from None
        self.coco_gt = coco_gt
        self.backend = backend
        if callable(label_to_category_id):
            self._to_category = label_to_category_id
        else:
            table = label_to_category_id
            self._to_category = lambda label: table[label]
        self._category_cache: dict[int, int] = {}
        self.summary = ""  # COCOeval's printed summary table of the last compute()
        self.reset()

    def reset(self) -> None:
        """Forget all detections (call at the start of every evaluation pass)."""
        self._per_image: dict[int, np.ndarray] = {}
        self._gathered: dict[int, np.ndarray] | None = None

    def _category_ids(self, labels: np.ndarray) -> np.ndarray:
        out = np.empty(len(labels), dtype=np.float64)
        for label in np.unique(labels):
            if int(label) not in self._category_cache:
                self._category_cache[int(label)] = int(self._to_category(int(label)))
            out[labels == label] = self._category_cache[int(label)]
        return out

    def update(self, image_ids: Tensor | Sequence[int], detections: Sequence[Mapping[str, Tensor]]) -> None:
        """Add one batch: ``image_ids`` (B,) and B dicts ``{scores, labels, boxes (K, 4) xyxy pixels}``
        (``PostProcess`` output, boxes in the original image)."""
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, Tensor) else image_ids)]
        if len(ids) != len(detections):
            raise ValueError(f"update() got {len(ids)} image ids but {len(detections)} detection dicts.")
        for image_id, det in zip(ids, detections):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(
                    f"Image id {image_id} is not in the ground-truth annotations; evaluate with the "
                    "coco_gt of the split the images came from."
                )
            boxes = det["boxes"].detach().float().cpu().numpy().reshape(-1, 4).astype(np.float64)
            scores = det["scores"].detach().float().cpu().numpy().astype(np.float64)
            labels = det["labels"].detach().cpu().numpy().astype(np.int64)
            rows = np.empty((len(scores), 7), dtype=np.float64)  # image id, x, y, w, h, score, category id
            rows[:, 0] = image_id
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = scores
            rows[:, 6] = self._category_ids(labels)
            self._per_image.setdefault(image_id, rows)  # a repeated image (DDP padding) counts once
            self._gathered = None

    def _gather(self) -> dict[int, np.ndarray]:
        """All processes' detections, once per image (the first rank that saw an image wins)."""
        if self._gathered is not None:
            return self._gathered
        world = _dist_world()[1]
        if world == 1:
            self._gathered = dict(self._per_image)
            return self._gathered
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, self._per_image)
        merged: dict[int, np.ndarray] = {}
        for part in parts:
            for image_id, rows in part.items():
                merged.setdefault(image_id, rows)
        self._gathered = merged
        return merged

    @staticmethod
    def _as_results(per_image: dict[int, np.ndarray]) -> list[dict]:
        results = []
        for rows in per_image.values():
            for r in rows:
                results.append(
                    {"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5])}
                )
        return results

    def compute(self) -> dict:
        """Metrics over every image seen by any process: ``mAP, mAP_50, mAP_75, mAP_s, mAP_m,
        mAP_l, AR_1, AR_10, AR_100`` (floats in [0, 1]; NaN where COCOeval has no ground truth,
        e.g. mAP_l without large objects) and ``per_class`` {class name: AP} for the classes
        with ground truth. Identical on every rank."""
        per_image = self._gather()
        rank, world = _dist_world()
        if world == 1:
            return self._evaluate(per_image)
        # Rank 0 evaluates; a failure there is sent along with the result, so the other ranks
        # raise it too instead of waiting in the broadcast forever.
        metrics, error = None, None
        if rank == 0:
            try:
                metrics = self._evaluate(per_image)
            except Exception as e:  # re-raised on every rank below
                error = e
        box = [(metrics, self.summary, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics, self.summary, error = box[0]
        if error is not None:
            raise error
        return metrics

    def _evaluate(self, per_image: dict[int, np.ndarray]) -> dict:
        if not per_image:
            raise ValueError("CocoEvaluator.compute() called before any update(); there is nothing to evaluate.")
        results = self._as_results(per_image)
        image_ids = sorted(per_image)
        quiet = io.StringIO()
        if self.backend == "pycocotools":
            from pycocotools.cocoeval import COCOeval

            with contextlib.redirect_stdout(quiet):
                detections = self.coco_gt.loadRes(results) if results else self._empty_results()
                coco_eval = COCOeval(self.coco_gt, detections, "bbox")
                coco_eval.params.imgIds = image_ids
                coco_eval.evaluate()
                coco_eval.accumulate()
            table = io.StringIO()
            with contextlib.redirect_stdout(table):
                coco_eval.summarize()
            self.summary = table.getvalue().rstrip()
        else:
            from faster_coco_eval import COCO, COCOeval_faster

            if not hasattr(self, "_faster_gt"):
                self._faster_gt = COCO(copy.deepcopy(self.coco_gt.dataset), print_function=lambda *a, **k: None)
            detections = self._faster_gt.loadRes(results)
            lines: list[str] = []
            coco_eval = COCOeval_faster(self._faster_gt, detections, "bbox", print_function=lambda *a, **k: None)
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.print_function = lambda *a, **k: lines.append(" ".join(str(x) for x in a))
            coco_eval.summarize()
            self.summary = "\n".join(lines)

        metrics = {name: _defined(float(v)) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
        metrics["per_class"] = self._per_class_ap(coco_eval)
        return metrics

    def _empty_results(self):
        """A detections ``COCO`` with no boxes (pycocotools' loadRes cannot take an empty list)."""
        from pycocotools.coco import COCO

        empty = COCO()
        empty.dataset = {"images": list(self.coco_gt.dataset["images"]), "categories": copy.deepcopy(self.coco_gt.dataset["categories"]), "annotations": []}
        empty.createIndex()
        return empty

    def _per_class_ap(self, coco_eval) -> dict[str, float]:
        # precision: (iou thresholds, recall points, categories, area ranges, max dets);
        # area range 0 is "all", the last max-dets entry is 100; -1 marks "no ground truth".
        precision = np.asarray(coco_eval.eval["precision"])
        names: dict[str, float] = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            if p.size == 0:
                continue
            name = str(self.coco_gt.cats[cat_id].get("name", cat_id))
            if name in names:
                name = f"{name} ({cat_id})"
            names[name] = float(p.mean())
        return names

    def write_results(self, path: str | os.PathLike) -> Path | None:
        """Write the COCO results JSON (``[{image_id, category_id, bbox [x, y, w, h], score}]``).

        Gathers across processes; rank 0 writes and returns the path, other ranks return None.
        """
        per_image = self._gather()
        if _dist_world()[0] != 0:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            json.dump(self._as_results(per_image), f)
        return path


def _defined(value: float) -> float:
    """COCOeval writes -1 for "no ground truth in this range"; report that as NaN."""
    return float("nan") if value < 0 else value


# ------------------------------------------------------------------ the printed table
# The rows of COCOeval's summary: (metric, kind, short name, IoU range, area, max detections).
_ROWS = (
    ("mAP", "Average Precision ", "(AP)", "0.50:0.95", "all", 100),
    ("mAP_50", "Average Precision ", "(AP)", "0.50     ", "all", 100),
    ("mAP_75", "Average Precision ", "(AP)", "0.75     ", "all", 100),
    ("mAP_s", "Average Precision ", "(AP)", "0.50:0.95", "small", 100),
    ("mAP_m", "Average Precision ", "(AP)", "0.50:0.95", "medium", 100),
    ("mAP_l", "Average Precision ", "(AP)", "0.50:0.95", "large", 100),
    ("AR_1", "Average Recall    ", "(AR)", "0.50:0.95", "all", 1),
    ("AR_10", "Average Recall    ", "(AR)", "0.50:0.95", "all", 10),
    ("AR_100", "Average Recall    ", "(AR)", "0.50:0.95", "all", 100),
)


def _fmt(value: Any) -> str:
    """A metric with 3 decimals; "n/a" where COCOeval found no ground truth (NaN, -1 or None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0:
        return "  n/a"  # pycocotools writes -1 when a category/area has no ground truth
    return f"{value:.3f}"


def format_coco_table(
    metrics: Mapping[str, Any],
    queries_per_object: Optional[Mapping[float, float]] = None,
    title: str = "COCO bbox evaluation",
    columns: int = 3,
    summary: str = "",
) -> str:
    """The COCO summary, the per-class AP (skipping "N/A" classes) and the queries per object.

    ``summary`` is COCOeval's own 12-line summary (``CocoEvaluator.summary``); without it the 9
    metrics of ``metrics`` are written in the same layout.
    """
    lines = [title, "-" * len(title)]
    if summary:
        lines.extend(summary.splitlines())
    else:
        for key, kind, short, iou, area, max_dets in _ROWS:
            if key in metrics:
                lines.append(
                    f" {kind} {short} @[ IoU={iou} | area={area:>6s} | maxDets={max_dets:>3d} ] = {_fmt(metrics[key])}"
                )
    per_class = {k: v for k, v in (metrics.get("per_class") or {}).items() if k != "N/A"}
    if per_class:
        lines.append("")
        lines.append("Per-class AP @[ IoU=0.50:0.95 | area=all | maxDets=100 ]")
        width = max(len(name) for name in per_class) + 2
        cells = [f"{name:<{width}}{_fmt(ap)}" for name, ap in per_class.items()]
        for start in range(0, len(cells), columns):
            lines.append("  " + "   ".join(cells[start : start + columns]))
    if queries_per_object:
        lines.append("")
        values = ", ".join(f"t={float(t):.1f}: {float(v):.2f}" for t, v in queries_per_object.items())
        lines.append(f"Queries per object (one-to-many score above t): {values}")
    return "\n".join(lines)
