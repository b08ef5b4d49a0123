"""Train DAC-DETR: `python -m dac_detr.train [experiment=NAME] [key=value ...]`.

Bare `python -m dac_detr.train` is the quickstart (tiny model, synthetic data, CPU). The COCO
recipes: `experiment=r50_12ep | r50_24ep | swin_l | swin_l_24ep` (+ `_baseline`, `_dac_cdn`).
Sweeps: `-m dac.o2m.threshold=0.3,0.4,0.5 dac.o2m.topk=4,6,8`, or `-m hparams_search=dac_o2m`.
Resume a killed run with the same command plus `ckpt_path=last` (or `resume=true`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from .utils.checkpoint_io import AtomicCheckpointIO
from .utils.config_checks import ConfigError, check_config
from .utils.data_order import make_train_order_reproducible
from .utils.instantiate import build_callbacks, build_datamodule, build_loggers, build_module
from .utils.resume import find_last_checkpoint, read_checkpoint_metadata
from .utils.task import task_wrapper

log = logging.getLogger("dac_detr")


def _job_info(cfg: DictConfig) -> dict[str, Any]:
    """W&B name/group: a multirun's jobs share a group and are named by their overrides."""
    if not HydraConfig.initialized():
        return {"name": cfg.task_name, "group": cfg.task_name}
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        overrides = hc.job.override_dirname or f"job{hc.job.num}"
        return {"name": f"{cfg.task_name}:{overrides}", "group": f"{cfg.task_name}/{Path(hc.sweep.dir).name}"}
    return {"name": cfg.task_name, "group": cfg.task_name}


def _spawn_ddp_under_local_multirun(cfg: DictConfig) -> None:
    """Lightning's ``ddp`` re-executes the command line for the other ranks; under a local Hydra
    multirun (``-m``) that command is the whole sweep. ``ddp_spawn`` starts the ranks from inside
    this job instead. (SLURM/torchrun launch the ranks themselves and keep ``ddp``.)"""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if "SLURM_NTASKS" in os.environ or "LOCAL_RANK" in os.environ:
        return
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and strategy.startswith("ddp") and not strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        spawned = "ddp_spawn" + strategy[len("ddp"):]
        log.warning("Local multirun: trainer.strategy=%s -> %s (ddp would relaunch the whole sweep per rank).", strategy, spawned)
        with open_dict(cfg):
            cfg.trainer.strategy = spawned


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resolve_checkpoint(cfg: DictConfig) -> Optional[str]:
    """The checkpoint to resume from: ``ckpt_path`` (a path or ``last``), or ``resume=true``."""
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume") and ckpt_path is None:
        ckpt_path = "last"
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        search_dir = Path(cfg.paths.log_dir) / cfg.task_name
        found = find_last_checkpoint(search_dir, _task_overrides())
        if found is None:
            raise ConfigError(
                f"ckpt_path=last: no last.ckpt of a run with the same overrides under {search_dir}. "
                "Give the checkpoint path instead (ckpt_path=/path/to/last.ckpt), or start without ckpt_path."
            )
        log.info("Resuming from %s", found)
        return str(found)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file. Give an existing .ckpt path or `last`.")
    return str(path)


def run_metadata(cfg: DictConfig, datamodule) -> dict[str, Any]:
    """What every checkpoint carries so evaluate/predict/export can rebuild the detector."""
    category_ids = []
    for label in range(datamodule.num_classes):
        try:
            category_ids.append(int(datamodule.label_to_category_id(label)))
        except (KeyError, ValueError, IndexError):
            category_ids.append(-1)  # an unused class index of the `raw` mapping
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": list(datamodule.class_names),
        "category_ids": category_ids,
    }


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and validate) one configuration; returns the final callback metrics."""
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    ckpt_path = resolve_checkpoint(cfg)
    metadata = read_checkpoint_metadata(ckpt_path) if ckpt_path else {}
    if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        # Keep writing next to the resumed checkpoints, so the best-model tracking carries on.
        with open_dict(cfg):
            for node in (cfg.get("callbacks") or {}).values():
                if node is not None and str(node.get("_target_", "")).endswith("ModelCheckpoint"):
                    node.dirpath = str(Path(ckpt_path).parent)

    log.info("Data: %s", cfg.data._target_)
    datamodule = build_datamodule(cfg, "fit")
    log.info("Model: %s with %s, %d classes", cfg.model._target_, cfg.backbone._target_, datamodule.num_classes)
    module = build_module(cfg, datamodule.num_classes, training=True)
    module.run_metadata = run_metadata(cfg, datamodule)

    _spawn_ddp_under_local_multirun(cfg)
    loggers = build_loggers(cfg, metadata.get("wandb_run_id"), _job_info(cfg))
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    if trainer.world_size == 1:
        # Under DDP, Lightning's DistributedSampler already orders the data by (seed, epoch).
        make_train_order_reproducible(datamodule, cfg.seed if cfg.get("seed") is not None else 0)
    for logger in loggers:
        logger.log_hyperparams(module.run_metadata["config"])

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    if cfg.get("validate_after_fit"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        log.info("Validating %s", best or "the final weights")
        trainer.validate(module, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    best_path = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best_path:
        log.info("Best checkpoint: %s", best_path)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was not logged (logged: {sorted(metrics)}); "
            "set optimized_metric to one of them."
        )
    return metrics[name]


if __name__ == "__main__":
    main()
