"""Inference-only weights: `python -m dac_detr.export ckpt=PATH [out=FILE] [use_ema=true]`.

The export keeps only what inference needs: the detector's weights (EMA ones when the run had
EMA), with the DN label book dropped and the C-Decoder and denoising switched off in the stored
config (the C-Decoder has no weights of its own: it reuses the O-Decoder's layers). Optimizer,
scheduler, criterion and loop state are left out. ``{"model": state_dict, "dac_detr": metadata}``
loads with ``dac_detr.evaluate`` and ``dac_detr.predict`` like a training checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from .utils.checkpoint import (
    MODEL_PREFIX,
    CheckpointError,
    checkpoint_metadata,
    detector_state_dict,
    load_checkpoint_file,
    load_detector_weights,
    without_pretrained_download,
)
from .utils.checkpoint_io import atomic_torch_save
from .utils.instantiate import build_detector

log = logging.getLogger("dac_detr")


def inference_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """The training config with the training-only branches (C-Decoder, denoising) switched off."""
    cfg = OmegaConf.create(train_config)
    cfg.dac.enabled = False
    if "dac_enabled" in cfg.model:
        cfg.model.dac_enabled = False
    if "dn_number" in cfg.model:
        cfg.model.dn_number = 0
    return OmegaConf.to_container(cfg, resolve=True)


def export_checkpoint(ckpt: str | Path, out: Optional[str | Path] = None, use_ema: bool = True) -> Path:
    """Write the inference-only export of ``ckpt``; returns its path."""
    checkpoint = load_checkpoint_file(ckpt)
    metadata = checkpoint_metadata(checkpoint)
    if not metadata.get("config"):
        raise CheckpointError(f"{ckpt} carries no training config; export takes checkpoints written by dac_detr.train.")
    has_ema = "current_model_state" in checkpoint
    if has_ema and not use_ema:
        # Lightning's WeightAveraging keeps the averaged weights in state_dict and the raw ones here.
        state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["current_model_state"].items() if k.startswith(MODEL_PREFIX)}
    else:
        state = detector_state_dict(checkpoint)

    config = inference_config(metadata["config"])
    build_cfg = OmegaConf.create(config)
    without_pretrained_download(build_cfg)
    model = build_detector(build_cfg, len(metadata.get("class_names") or []))
    needed = set(model.state_dict())
    missing = needed - set(state)
    if missing:
        raise CheckpointError(f"{ckpt} lacks inference weights {sorted(missing)[:8]}; is it a dac_detr checkpoint?")
    inference_state = {k: v.detach().clone() for k, v in state.items() if k in needed}
    load_detector_weights(model, inference_state, str(ckpt))  # the export must load strictly

    dropped = sorted(set(state) - needed)
    out_path = Path(out) if out else Path(ckpt).with_suffix(".export.pt")
    export = {
        "model": inference_state,
        "dac_detr": {
            **{k: v for k, v in metadata.items() if k != "wandb_run_id"},
            "config": config,
            "exported_from": str(Path(ckpt).resolve()),
            "ema": bool(has_ema and use_ema),
            "dropped_keys": dropped,
        },
    }
    atomic_torch_save(export, out_path)
    n_params = sum(v.numel() for v in inference_state.values())
    log.info("Exported %d tensors (%.2f M values, EMA: %s) to %s; dropped %s", len(inference_state), n_params / 1e6, export["dac_detr"]["ema"], out_path, dropped)
    print(f"Exported inference weights to {out_path} (EMA weights: {export['dac_detr']['ema']})", flush=True)
    return out_path


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export_checkpoint(cfg.ckpt, cfg.get("out"), bool(cfg.use_ema))


if __name__ == "__main__":
    main()
