"""`ckpt_path=last` / `resume=true`: find the run to continue."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import yaml

from .checkpoint import read_checkpoint_file

# Overrides that may differ between the interrupted run and its continuation.
_IGNORED_OVERRIDE_KEYS = {"ckpt_path", "resume", "trainer.max_epochs", "hydra.run.dir", "hydra.sweep.dir"}


def _normalised(overrides: Iterable[str]) -> list[str]:
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key not in _IGNORED_OVERRIDE_KEYS:
            kept.append(item.lstrip("+"))
    return sorted(kept)


def find_last_checkpoint(search_dir: str | Path, overrides: Iterable[str]) -> Optional[Path]:
    """The newest ``checkpoints/last.ckpt`` under ``search_dir`` whose run had the same overrides.

    Every Hydra job folder keeps its command-line overrides in ``.hydra/overrides.yaml``; matching
    them means a sweep job resumes its own run, not its neighbour's.
    """
    wanted = _normalised(overrides)
    candidates = []
    for ckpt in Path(search_dir).glob("**/checkpoints/last.ckpt"):
        run_dir = ckpt.parent.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        if _normalised(yaml.safe_load(overrides_file.read_text()) or []) == wanted:
            candidates.append(ckpt)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def read_resume_checkpoint(path: str | Path) -> dict:
    """The checkpoint to resume, memory-mapped (its ``dac_detr`` entry: config, class names, W&B run id)."""
    return read_checkpoint_file(
        path, trusted=True, mmap=True, fix="Resume from a last.ckpt written by dac_detr.train (ckpt_path=PATH or last)."
    )
