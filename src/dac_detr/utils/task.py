"""The task wrapper of the entry points: one clean W&B finish per job, whatever happens."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from .wandb_utils import finish_wandb_run

log = logging.getLogger("dac_detr")


def task_wrapper(task: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``task`` and always finish the W&B run afterwards.

    Without it a crashed or finished job leaves its W&B run open and the next Hydra multirun job
    logs into the same run (wandb#1314, lightning-hydra-template#289).
    """

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception:
            log.exception("The task failed; see the traceback above. Its output directory keeps the logs.")
            raise
        finally:
            finish_wandb_run()

    return wrapped
