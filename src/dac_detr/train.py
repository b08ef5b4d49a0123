"""Train DAC-DETR: `python -m dac_detr.train [experiment=NAME] [key=value ...]`.

Bare `python -m dac_detr.train` is the quickstart (tiny model, synthetic data, CPU). The COCO
recipes: `experiment=r50_12ep | r50_24ep | swin_l | swin_l_24ep` (+ `_baseline`, `_dac_cdn`).
Sweeps: `-m dac.o2m.threshold=0.3,0.4,0.5 dac.o2m.topk=4,6,8`, or `-m hparams_search=dac_o2m`.
Resume a killed run with the same command plus `ckpt_path=last` (or `resume=true`).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from .utils.checkpoint import CheckpointError, compare_state_dicts, without_pretrained_download
from .utils.checkpoint_io import AtomicCheckpointIO
from .utils.config_checks import ConfigError, check_arguments, check_config
from .utils.data_order import make_train_order_reproducible
from .utils.init_from import init_from_weights
from .utils.instantiate import build_callbacks, build_datamodule, build_loggers, build_module
from .utils.interrupt import SaveOnInterrupt
from .utils.plugins import missing_sweep_plugin
from .utils.resume import find_last_checkpoint, read_resume_checkpoint
from .utils.sweep_summary import write_job_metrics
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


def _resume_command() -> str:
    """This command without ckpt_path/resume/init_from: what a stopped run is resumed with."""
    kept = [o for o in _task_overrides() if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "resume", "init_from")]
    return " ".join(["python -m dac_detr.train", *(shlex.quote(o) for o in kept)])


def _checkpoint_dir(cfg: DictConfig) -> Path:
    for node in (cfg.get("callbacks") or {}).values():
        if node is not None and str(node.get("_target_", "")).endswith("ModelCheckpoint"):
            return Path(node.dirpath)
    return Path(cfg.paths.output_dir) / "checkpoints"


def _read_resume_checkpoint(cfg: DictConfig, ckpt_path: Optional[str]) -> dict[str, Any]:
    """The checkpoint to resume (memory-mapped), after ``ckpt_path``/``init_from`` sanity checks."""
    if ckpt_path and cfg.get("init_from"):
        raise ConfigError(
            "ckpt_path and init_from are both set: ckpt_path resumes a run (its optimizer, schedule, epoch), "
            "init_from starts a new run from the weights. Give one of them."
        )
    if not ckpt_path:
        return {}
    checkpoint = read_resume_checkpoint(ckpt_path)
    if Path(ckpt_path).parent.name == "checkpoints":
        # Keep writing next to the resumed checkpoints, so the best-model tracking carries on.
        with open_dict(cfg):
            for node in (cfg.get("callbacks") or {}).values():
                if node is not None and str(node.get("_target_", "")).endswith("ModelCheckpoint"):
                    node.dirpath = str(Path(ckpt_path).parent)
    return checkpoint


def _check_resume_fits(module: L.LightningModule, checkpoint: dict[str, Any], ckpt_path: str) -> None:
    diff = compare_state_dicts(module.state_dict(), checkpoint.get("state_dict") or {})
    if not diff.complete:
        raise CheckpointError(
            f"ckpt_path={ckpt_path} is a checkpoint of another model than this command builds, so it cannot "
            f"be resumed:\n{diff.listing()}\nResume with the overrides the run was started with, or start a new "
            f"run from its weights with init_from={ckpt_path} (loads what fits)."
        )


def warn_if_more_objects_than_queries(datamodule, num_queries: int) -> None:
    """One WARNING when a training image has more objects than the detector has queries.

    The one-to-one matching can then pair only ``num_queries`` of them, so the others never get a
    prediction of their own; the run still works, which is why this is a warning and not an error.
    """
    split = datamodule.dataset("train").split
    per_image = np.diff(split.offsets)
    crowded = per_image > num_queries
    if crowded.any():
        worst = int(per_image.argmax())
        log.warning(
            "%d training images have more objects than model.num_queries=%d (most: %d in %s); the one-to-one "
            "matching leaves the extra objects unmatched. Raise model.num_queries above %d.",
            int(crowded.sum()), num_queries, int(per_image[worst]), split.file_names[worst], int(per_image.max()),
        )


def _build_trainer(cfg: DictConfig, loggers: list, resume_command: str):
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    callbacks.append(SaveOnInterrupt(_checkpoint_dir(cfg), resume_command))
    check_arguments(cfg.trainer, "trainer")
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])


@task_wrapper
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and validate) one configuration; returns the final callback metrics."""
    check_config(cfg)
    log.info("Run folder: %s", cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_checkpoint(cfg)
    checkpoint = _read_resume_checkpoint(cfg, ckpt_path)
    if cfg.get("init_from"):
        without_pretrained_download(cfg)  # the weights come from init_from

    log.info("Data: %s", cfg.data._target_)
    datamodule = build_datamodule(cfg, "fit")
    log.info("Model: %s with %s, %d classes", cfg.model._target_, cfg.backbone._target_, datamodule.num_classes)
    warn_if_more_objects_than_queries(datamodule, int(cfg.model.num_queries))
    module = build_module(cfg, datamodule.num_classes, training=True)
    module.run_metadata = run_metadata(cfg, datamodule)
    if ckpt_path:
        _check_resume_fits(module, checkpoint, ckpt_path)
    if cfg.get("init_from"):
        init_from_weights(module.model, cfg.init_from, report_dir=cfg.paths.output_dir)

    _spawn_ddp_under_local_multirun(cfg)
    loggers = build_loggers(cfg, (checkpoint.get("dac_detr") or {}).get("wandb_run_id"), _job_info(cfg))
    trainer = _build_trainer(cfg, loggers, _resume_command())
    if trainer.world_size == 1:
        # Under DDP, Lightning's DistributedSampler already orders the data by (seed, epoch).
        make_train_order_reproducible(datamodule, cfg.seed if cfg.get("seed") is not None else 0)
    for logger in loggers:
        logger.log_hyperparams(module.run_metadata["config"])

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Lightning stops on SIGTERM with a SystemExit that has no code (exit status 0), after
        # SaveOnInterrupt wrote last.ckpt. A preempted job must not look finished to SLURM or a
        # script: exit with the status of a process killed by SIGTERM (128 + 15).
        raise SystemExit(128 + signal.SIGTERM) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    if cfg.get("validate_after_fit"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        log.info("Validating %s", best or "the final weights")
        trainer.validate(module, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    best_path = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best_path:
        log.info("Best checkpoint: %s", best_path)
    log.info("Run folder: %s", cfg.paths.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    metrics = train(cfg)
    if HydraConfig.initialized():
        write_job_metrics(cfg.paths.output_dir, metrics)  # read by the table at the end of a multirun
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was not logged (logged: {sorted(metrics)}); "
            "set optimized_metric to one of them."
        )
    return metrics[name]


def main() -> None:
    """The command line (``python -m dac_detr.train``, ``dac-detr-train``)."""
    missing = missing_sweep_plugin(sys.argv[1:])
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        raise SystemExit(1)
    _hydra_main()


if __name__ == "__main__":
    main()
