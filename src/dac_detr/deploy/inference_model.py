"""A checkpoint as an inference model: the eval-mode detector and what describes its outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from ..utils.checkpoint import (
    MODEL_PREFIX,
    CheckpointError,
    checkpoint_metadata,
    detector_state_dict,
    load_checkpoint_file,
    load_detector_weights,
    without_pretrained_download,
)
from ..utils.instantiate import build_detector


def inference_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """The training config with the training-only branches (C-Decoder, denoising) switched off."""
    cfg = OmegaConf.create(train_config)
    cfg.dac.enabled = False
    if "dac_enabled" in cfg.model:
        cfg.model.dac_enabled = False
    if "dn_number" in cfg.model:
        cfg.model.dn_number = 0
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass
class InferenceModel:
    """The detector of a checkpoint, ready for inference.

    ``model`` is in eval mode (O-Decoder only: the C-Decoder and denoising never run at eval) and
    holds the EMA weights when the checkpoint has them and ``use_ema``; ``state`` is exactly the
    state dict it was loaded with. ``class_names[label]`` / ``category_ids[label]`` describe
    class index ``label``; ``config`` is the inference config (data, backbone, model,
    postprocess nodes of the training run).
    """

    model: nn.Module
    state: dict[str, Any]
    config: dict[str, Any]
    metadata: dict[str, Any]
    class_names: list[str]
    category_ids: list[int]
    ema: bool
    dropped_keys: list[str]


def load_inference_model(ckpt: str | Path, use_ema: bool = True) -> InferenceModel:
    """Read ``ckpt`` (a training checkpoint or a ``dac_detr.export`` file) and build its detector.

    Raises CheckpointError (one line naming the fix) for a missing, truncated or foreign file.
    """
    checkpoint = load_checkpoint_file(ckpt)
    metadata = checkpoint_metadata(checkpoint)
    if not metadata.get("config"):
        raise CheckpointError(
            f"{ckpt} carries no training config, so the detector cannot be rebuilt: pass a checkpoint written by "
            "dac_detr.train or dac_detr.export (a converted official checkpoint works with dac_detr.evaluate only)."
        )
    has_ema = "current_model_state" in checkpoint
    if has_ema and not use_ema:
        # Lightning's WeightAveraging keeps the averaged weights in state_dict and the raw ones here.
        state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["current_model_state"].items() if k.startswith(MODEL_PREFIX)}
    else:
        state = detector_state_dict(checkpoint)

    config = inference_config(metadata["config"])
    build_cfg = OmegaConf.create(config)
    without_pretrained_download(build_cfg)
    class_names = [str(n) for n in (metadata.get("class_names") or [])]
    if not class_names:
        raise CheckpointError(f"{ckpt} carries no class names; pass a checkpoint written by dac_detr.train or dac_detr.export.")
    model = build_detector(build_cfg, len(class_names))
    needed = set(model.state_dict())
    missing = needed - set(state)
    if missing:
        raise CheckpointError(f"{ckpt} lacks inference weights {sorted(missing)[:8]}; is it a dac_detr checkpoint?")
    inference_state = {k: v.detach().clone() for k, v in state.items() if k in needed}
    load_detector_weights(model, inference_state, str(ckpt))  # strict
    model.eval()
    category_ids = [int(c) for c in (metadata.get("category_ids") or range(len(class_names)))]
    ema = bool(metadata.get("ema")) if "ema" in metadata else bool(has_ema and use_ema)
    return InferenceModel(model, inference_state, config, metadata, class_names, category_ids, ema,
                          sorted(set(state) - needed))
