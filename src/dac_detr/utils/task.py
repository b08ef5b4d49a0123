"""The task wrapper of the entry points: one clean W&B finish per job, whatever happens."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from .wandb_utils import finish_wandb_run

log = logging.getLogger("dac_detr")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input (data, checkpoints, weights, config): their messages already
    name the problem and the fix, so they are printed alone, without a traceback."""
    from ..data.errors import DataError
    from ..models.backbone_common import PretrainedWeightsUnavailable
    from ..models.convert import NotAnOfficialCheckpointError
    from .checkpoint import CheckpointError
    from .config_checks import ConfigError

    return (DataError, PretrainedWeightsUnavailable, NotAnOfficialCheckpointError, CheckpointError, ConfigError)


def task_wrapper(task: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``task`` and always finish the W&B run afterwards.

    Without it a crashed or finished job leaves its W&B run open and the next Hydra multirun job
    logs into the same run (wandb#1314, lightning-hydra-template#289).
    """

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except _user_errors() as err:
            log.error("%s: %s", type(err).__name__, err)
            raise SystemExit(1) from None
        except Exception:
            log.exception("The task failed; see the traceback above. Its output directory keeps the logs.")
            raise
        finally:
            finish_wandb_run()

    return wrapped
