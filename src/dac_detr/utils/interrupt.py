"""Never lose an epoch: ``last.ckpt`` on Ctrl-C, SIGTERM (SLURM's notice before preemption) and a
crash during fitting (e.g. in validation, after an epoch of training), with the resume command."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("dac_detr")


class SaveOnInterrupt(L.Callback):
    """Write ``dirpath/last.ckpt`` when fitting stops early, then print ``resume_command`` with its path.

    Lightning turns SIGTERM into a SIGTERMException at the next batch and Ctrl-C into a
    KeyboardInterrupt; both reach ``on_exception`` on every rank. Other errors are saved only in a
    single process (under DDP the other ranks would wait for the failed one at the save barrier).
    """

    def __init__(self, dirpath: str | Path, resume_command: str) -> None:
        self.dirpath = Path(dirpath)
        self.resume_command = resume_command

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if trainer.state.fn != "fit" or trainer.global_step == 0 or (not stopped and trainer.world_size > 1):
            return
        path = self.dirpath / "last.ckpt"
        reason = type(exception).__name__
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - the original error matters more; say what was lost
            log.error("%s at step %d: could not write %s (%s)", reason, trainer.global_step, path, err)
            return
        if trainer.is_global_zero:
            log.warning("%s at step %d: saved %s. Resume with:\n  %s ckpt_path=%s",
                        reason, trainer.global_step, path, self.resume_command, path)
