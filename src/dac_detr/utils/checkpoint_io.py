"""Checkpoint files that are never left half-written.

A run killed while Lightning writes ``last.ckpt`` would otherwise leave a truncated file behind, and
``ckpt_path=last`` would then fail to resume. Writing to a temporary file in the same directory and
renaming it with ``os.replace`` (atomic on POSIX and Windows) means a reader sees either the old
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Whatever went wrong (including KeyboardInterrupt), the old checkpoint stays intact.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with an atomic write (temp file + ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}: "
                "remove them or use Lightning's default checkpoint IO."
            )
        atomic_torch_save(checkpoint, path)
