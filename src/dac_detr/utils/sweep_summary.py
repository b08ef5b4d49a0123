"""The table at the end of a multirun: each job's overrides, its final metric and its folder.

Every training job writes ``final_metrics.json`` into its folder (``write_job_metrics``); the
Hydra callback reads those files at the end of the sweep, so the table is the same whichever
launcher ran the jobs (in this process, or on SLURM nodes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

METRICS_FILE = "final_metrics.json"


def write_job_metrics(output_dir: str | Path, metrics: Mapping[str, float]) -> None:
    """Store a finished job's final metrics next to its checkpoints (read by the sweep table)."""
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in sorted(metrics.items()) if math.isfinite(v)}, indent=1))


def sweep_table(sweep_dir: str | Path, metric: str) -> str:
    """One line per job folder under ``sweep_dir``: job number, ``metric`` (or 'failed'), overrides, folder."""
    rows = []
    for job_dir in sorted((d for d in Path(sweep_dir).iterdir() if d.is_dir()), key=_job_order):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = " ".join(yaml.safe_load(overrides_file.read_text()) or []) or "(none)"
        metrics_file = job_dir / METRICS_FILE
        value: Any = json.loads(metrics_file.read_text()).get(metric) if metrics_file.is_file() else None
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "failed"
        rows.append((job_dir.name, shown, overrides, str(job_dir)))
    if not rows:
        return f"No jobs under {sweep_dir}."
    header = ("job", metric, "overrides", "folder")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in (header, *rows)]
    return "\n".join(lines)


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): prints the sweep table when a multirun ends."""

    def __init__(self, metric: str = "val/mAP") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        print(f"\nSweep finished: {sweep_dir}\n{sweep_table(sweep_dir, self.metric)}", flush=True)
