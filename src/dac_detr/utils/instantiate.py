"""Build the parts of a run from the Hydra config (each class takes plain constructor arguments)."""

from __future__ import annotations

import logging
from typing import Any, Optional

from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from .config_checks import check_arguments

log = logging.getLogger("dac_detr")


def build_datamodule(cfg: DictConfig, stage: str = "fit") -> LightningDataModule:
    """The data module, prepared (downloads/synthetic generation) and set up, so its classes are known."""
    check_arguments(cfg.data, "data")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def build_detector(cfg: DictConfig, num_classes: int):
    """``model`` config + ``backbone`` config + the data set's number of classes -> the detector."""
    check_arguments(cfg.backbone, "backbone")
    check_arguments(cfg.model, "model")
    backbone = instantiate(cfg.backbone)
    return instantiate(cfg.model, backbone=backbone, num_classes=num_classes)


def build_module(cfg: DictConfig, num_classes: int, training: bool = True):
    """The LightningModule with the detector, the criterion (training only) and the post-processor."""
    model = build_detector(cfg, num_classes)
    criterion = instantiate(cfg.loss, num_classes=num_classes) if training else None
    optimizer = instantiate(cfg.optimizer) if training else None
    scheduler = instantiate(cfg.scheduler) if training and cfg.get("scheduler") else None
    qpo = instantiate(cfg.queries_per_object) if cfg.get("queries_per_object") else None
    return instantiate(
        cfg.module,
        model=model,
        criterion=criterion,
        postprocess=instantiate(cfg.postprocess),
        optimizer=optimizer,
        scheduler=scheduler,
        queries_per_object=qpo,
        _convert_="object",
    )


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[Callback]:
    """Every ``_target_`` entry of ``callbacks`` (null entries are skipped), plus EMA when on.

    Without a logger (``logger=none``) the learning-rate monitor has nowhere to write and is left out.
    """
    callbacks: list[Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"callbacks.{name} needs a `_target_` (got {OmegaConf.to_yaml(node)!r}).")
        if not has_logger and node._target_.endswith("LearningRateMonitor"):
            continue
        callbacks.append(instantiate(node))
    ema = cfg.get("ema")
    if ema is not None and ema.get("enabled"):
        from .ema import EMA

        callbacks.append(EMA(decay=ema.decay, start_step=ema.start_step, every_n_steps=ema.every_n_steps))
    return callbacks


def build_loggers(cfg: DictConfig, wandb_run_id: Optional[str] = None, job: Optional[dict[str, Any]] = None) -> list[Logger]:
    """Every entry of ``logger``; W&B gets its offline decision, run name/group and resume id."""
    loggers: list[Logger] = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"logger.{name} needs a `_target_` (got {OmegaConf.to_yaml(node)!r}).")
        if node._target_.endswith("WandbLogger"):
            loggers.append(_build_wandb(node, wandb_run_id, job or {}))
        else:
            loggers.append(instantiate(node))
    return loggers


def _build_wandb(node: DictConfig, wandb_run_id: Optional[str], job: dict[str, Any]) -> Logger:
    from .wandb_utils import wandb_should_run_offline

    overrides: dict[str, Any] = {}
    offline, reason = wandb_should_run_offline(bool(node.get("offline")))
    if offline and not node.get("offline"):
        log.warning("W&B runs offline: %s. Upload later with `wandb sync <run dir>` (printed at the end).", reason)
    overrides["offline"] = offline
    if node.get("name") is None and job.get("name"):
        overrides["name"] = job["name"]
    if node.get("group") is None and job.get("group"):
        overrides["group"] = job["group"]
    if wandb_run_id and node.get("id") is None:
        overrides["id"] = wandb_run_id
        overrides["resume"] = "allow"  # continue the run the checkpoint came from
    # Lightning's WandbLogger passes unknown kwargs to wandb.init; `reinit` keeps one run per job
    # even if an earlier job of this process did not finish its run.
    overrides["reinit"] = "finish_previous"
    return instantiate(node, **overrides)
