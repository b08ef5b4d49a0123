"""Read our Lightning checkpoints, exported weights and converted official checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

# Prefix of the detector inside the LightningModule's state dict.
MODEL_PREFIX = "model."


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit; the message says what to do."""


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; a clear error for a missing or unreadable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Pass ckpt=/path/to/file.ckpt (a run's checkpoints are in "
            "logs/<task_name>/runs/<time>/checkpoints/), an exported .pt, or a converted official checkpoint."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated file, not a torch file, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    return dict(checkpoint)


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
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        where = f" ({source})" if source else ""
        raise CheckpointError(
            f"The checkpoint{where} does not fit the model built from the config: build it with the "
            "model/backbone/data the checkpoint was trained with.\n"
            f"  missing ({len(missing)}): {missing[:8]}\n  unexpected ({len(unexpected)}): {unexpected[:8]}\n"
            f"  shape mismatch ({len(mis_shaped)}): {mis_shaped[:8]}"
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
