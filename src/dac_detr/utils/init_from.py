"""`init_from=PATH`: start a new run from existing weights (unlike `ckpt_path`, which resumes).

The weights that fit (same name, same shape) are loaded; the others keep the new model's
initialisation. Fine-tuning on a data set with another number of classes therefore re-initialises
the class heads and the denoising label book (their first dimension is the number of classes) and
loads everything else. The report lists every tensor and why it was loaded or not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import yaml
from torch import nn

from .checkpoint import CheckpointError, StateDictDiff, compare_state_dicts, detector_state_dict, load_checkpoint_file

log = logging.getLogger("dac_detr")

REPORT_FILE = "init_from.yaml"


def init_from_weights(model: nn.Module, path: str | Path, report_dir: Optional[str | Path] = None) -> StateDictDiff:
    """Load the fitting tensors of ``path`` (our checkpoint, an export, a converted official one) into ``model``.

    Writes ``report_dir/init_from.yaml`` (loaded / re-initialised / not in the file / unused) when given.
    """
    state = detector_state_dict(load_checkpoint_file(path))
    diff = compare_state_dicts(model.state_dict(), state)
    if not diff.fitting:
        raise CheckpointError(
            f"init_from={path}: none of its {len(state)} tensors fits this detector (another architecture?).\n"
            f"{diff.listing()}\nBuild the model/backbone the weights were trained with."
        )
    # strict=False because the tensors that do not fit are reported below, one by one.
    model.load_state_dict({name: state[name] for name in diff.fitting}, strict=False)
    log.info("init_from=%s: loaded %d of the model's %d tensors", path, len(diff.fitting), len(diff.fitting) + len(diff.missing) + len(diff.mis_shaped))
    for why, names in _skipped(diff).items():
        if names:
            log.warning("init_from: %d %s: %s", len(names), why, ", ".join(names))
    if report_dir is not None:
        report = {"init_from": str(path), "loaded": diff.fitting, **_skipped(diff)}
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / REPORT_FILE).write_text(yaml.safe_dump(report, sort_keys=False, width=200))
    return diff


def _skipped(diff: StateDictDiff) -> dict[str, list[str]]:
    return {
        "re-initialised, shape differs (class heads and the DN label book on another number of classes)": diff.mis_shaped,
        "re-initialised, not in the file": diff.missing,
        "in the file, not used by this model": diff.unexpected,
    }
