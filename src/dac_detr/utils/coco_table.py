"""The COCO table printed at the end of a validation (the pycocotools summary layout + per class)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

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
