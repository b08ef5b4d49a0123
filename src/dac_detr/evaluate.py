"""COCO evaluation of a checkpoint: `python -m dac_detr.evaluate ckpt=PATH [data=...]`.

Works with our checkpoints (the training config inside tells which detector and data set),
exported weights (`dac_detr.export`) and converted official checkpoints (give the groups that
describe them, e.g. `backbone=swin_l`; the defaults are the official R50 on COCO). Prints the
COCO table and writes the COCO results JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from .utils.checkpoint import (
    checkpoint_metadata,
    command_line_keys,
    detector_state_dict,
    load_checkpoint_file,
    load_detector_weights,
    merge_checkpoint_config,
    without_pretrained_download,
)
from .utils.instantiate import build_datamodule, build_loggers, build_module
from .utils.task import task_wrapper

log = logging.getLogger("dac_detr")


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the checkpoint ``cfg.ckpt`` on the val split; returns the COCO metrics."""
    checkpoint = load_checkpoint_file(cfg.ckpt)
    metadata = checkpoint_metadata(checkpoint)
    user_keys = command_line_keys(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized() else set()
    cfg = merge_checkpoint_config(cfg, metadata.get("config"), user_keys)
    without_pretrained_download(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg, "validate")
    module = build_module(cfg, datamodule.num_classes, training=False)
    load_detector_weights(module.model, detector_state_dict(checkpoint), str(cfg.ckpt))
    module.run_metadata = {**metadata, "class_names": list(datamodule.class_names)}

    trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False, callbacks=[], max_epochs=1)
    trainer.validate(module, datamodule=datamodule)
    metrics = dict(module.last_val_metrics)

    results_json = cfg.get("results_json") or str(Path(cfg.paths.output_dir) / "detections_val.json")
    written = module.evaluator.write_results(results_json)
    if written is not None:
        log.info("COCO results JSON: %s", written)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    return float(evaluate(cfg)["mAP"])


if __name__ == "__main__":
    main()
