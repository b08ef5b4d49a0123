"""Read checkpoints (the one reader of checkpoint files) and compare/load their weights: our Lightning
checkpoints, exported weights, converted official checkpoints, backbone weights."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

# Prefix of the detector inside the LightningModule's state dict.
MODEL_PREFIX = "model."


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit; the message says what to do."""


def read_checkpoint_file(
    path: str | Path,
    *,
    fix: str,
    error: type[CheckpointError] = CheckpointError,
    trusted: bool = False,
    allowed_globals: Sequence[type] = (),
    mmap: bool = False,
) -> dict[str, Any]:
    """The one reader of checkpoint files (training checkpoints, exports, converted and official
    checkpoints, backbone weights); every failure is ``error`` with a message ending in ``fix``.

    ``trusted=False`` reads with ``torch.load(weights_only=True)``: no code from the file runs, and
    only the classes in ``allowed_globals`` may be unpickled. ``trusted=True`` is for checkpoints
    written by dac_detr.train (Lightning pickles loop and callback state). ``mmap=True`` maps the
    tensors instead of reading them (for a look at the metadata of a large checkpoint).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"{path} does not exist. {fix}")
    try:
        if trusted:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        else:
            with torch.serialization.safe_globals(list(allowed_globals)):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if not refused:  # not a pickle at all
            raise error(f"could not read {path} as a PyTorch checkpoint (not a torch file, or truncated). {fix}") from err
        raise error(
            f"could not read {path} with torch.load(weights_only=True): {refused[0]}. It stores Python objects beyond "
            "tensors. If you trust the file, keep only its weights: python -c \"import torch; torch.save({'model': "
            f"torch.load('{path}', weights_only=False)['model']}}, 'model_only.pth')\" and pass model_only.pth."
        ) from err
    except Exception as err:  # truncated file, not a torch file, a directory, ...
        raise error(f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}). {fix}") from err
    if not isinstance(checkpoint, Mapping):
        raise error(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict. {fix}")
    return dict(checkpoint)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint for evaluate/predict/export/init_from: ours, an export or a converted official one."""
    return read_checkpoint_file(
        path,
        trusted=True,
        fix="Pass ckpt=/path/to/file.ckpt (a run's checkpoints are in logs/<task_name>/runs/<time>/checkpoints/), "
        "an exported .pt, or a converted official checkpoint.",
    )


@dataclass
class StateDictDiff:
    """How a state dict compares with a model's: the names that fit and those that do not."""

    fitting: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mis_shaped: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)

    def listing(self, limit: int = 8) -> str:
        return (
            f"  missing ({len(self.missing)}): {self.missing[:limit]}\n"
            f"  unexpected ({len(self.unexpected)}): {self.unexpected[:limit]}\n"
            f"  shape mismatch ({len(self.mis_shaped)}): {self.mis_shaped[:limit]}"
        )


def compare_state_dicts(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> StateDictDiff:
    """Which entries of ``given`` fit ``expected`` (a model's state dict) by name and shape."""
    diff = StateDictDiff(unexpected=sorted(set(given) - set(expected)))
    for name, tensor in expected.items():
        if name not in given:
            diff.missing.append(name)
        elif tuple(given[name].shape) != tuple(tensor.shape):
            diff.mis_shaped.append(f"{name}: checkpoint {tuple(given[name].shape)} vs model {tuple(tensor.shape)}")
        else:
            diff.fitting.append(name)
    return diff


def detector_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The detector's weights from any of our formats.

    * a Lightning checkpoint: ``state_dict`` with ``model.*`` keys (with EMA on, Lightning's
      WeightAveraging stores the averaged weights there and the raw ones under ``current_model_state``);
    * an export (``dac_detr.export``) or a converted official checkpoint: ``{"model": state_dict}``.
    """
    if "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
        return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = dict(checkpoint["model"])
        if any(k.startswith("backbone.0.body.") for k in state):
            raise CheckpointError(
                "This is an official DAC-DETR checkpoint, not yet converted: run "
                "`python scripts/convert_official.py OFFICIAL.pth CONVERTED.pth` and pass the converted file."
            )
        return state
    raise CheckpointError(
        f"Unknown checkpoint layout (top-level keys {sorted(checkpoint)[:8]}); expected a Lightning checkpoint "
        "('state_dict') or an exported/converted one ('model')."
    )


def checkpoint_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``{"config", "class_names", "category_ids", ...}`` stored by dac_detr.train, or {}."""
    return dict(checkpoint.get("dac_detr") or {})


def load_detector_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: Optional[str] = None) -> None:
    """Strict load with a readable report of what does not fit."""
    diff = compare_state_dicts(model.state_dict(), state_dict)
    if not diff.complete:
        where = f" ({source})" if source else ""
        raise CheckpointError(
            f"The checkpoint{where} does not fit the model built from the config: build it with the "
            f"model/backbone/data the checkpoint was trained with.\n{diff.listing()}"
        )
    model.load_state_dict(state_dict, strict=True)


# Config nodes that describe the detector and its data; taken from the checkpoint unless the
# command line sets them.
DETECTOR_NODES = ("data", "backbone", "model", "dac", "postprocess")


def command_line_keys(overrides: list[str]) -> set[str]:
    """Top-level keys the user set on the command line (``data=coco``, ``model.num_queries=300``)."""
    return {item.split("=", 1)[0].lstrip("+~").split(".")[0].split("/")[0] for item in overrides}


def merge_checkpoint_config(cfg, checkpoint_config: Optional[Mapping[str, Any]], user_keys: set[str]):
    """``cfg`` with the detector nodes replaced by the checkpoint's, except those the user set."""
    from omegaconf import OmegaConf, open_dict

    if not checkpoint_config:
        return cfg
    with open_dict(cfg):
        for key in DETECTOR_NODES:
            if key in user_keys or key not in checkpoint_config:
                continue
            cfg[key] = OmegaConf.create(checkpoint_config[key])
    return cfg


def without_pretrained_download(cfg) -> None:
    """The checkpoint holds every weight: do not fetch ImageNet backbone weights first."""
    from omegaconf import open_dict

    if "pretrained" in cfg.backbone:
        with open_dict(cfg):
            cfg.backbone.pretrained = None
