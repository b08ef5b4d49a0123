"""The error boundary of every entry point (train, evaluate, predict, export, the converter).

User errors (bad data, checkpoints, weights, config values, a missing mandatory value) end the
command with their message alone and exit code 1; any other error keeps its traceback. Whatever
happens, the W&B run of the job is finished.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

from .wandb_utils import finish_wandb_run

log = logging.getLogger("dac_detr")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input: their messages already name the problem and the fix.

    CheckpointError covers the pretrained-weight and official-checkpoint errors (its subclasses);
    Lightning's MisconfigurationException names the conflicting Trainer settings.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import MissingMandatoryValue

    from ..data.errors import DataError
    from .checkpoint import CheckpointError
    from .config_checks import ConfigError

    return (DataError, CheckpointError, ConfigError, MissingMandatoryValue, MisconfigurationException)


def user_error_message(err: BaseException) -> Optional[str]:
    """The one line to print for a user error, or None for a bug (keep its traceback).

    Hydra's ``instantiate`` wraps what a constructor raises in an InstantiationException: the
    cause chain is searched, so a DataError raised inside a data module reads the same.
    """
    from omegaconf.errors import MissingMandatoryValue

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MissingMandatoryValue):
            key = getattr(err, "full_key", None) or "a value"
            return f"MissingValue: `{key}` is required: give it on the command line ({key}=...)."
        if isinstance(err, _user_errors()):
            return f"{type(err).__name__}: {err}"
        err = err.__cause__
    return None


def task_wrapper(task: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``task`` behind the error boundary and always finish the W&B run afterwards.

    Without the finish a crashed or finished job leaves its W&B run open and the next Hydra
    multirun job logs into the same run (wandb#1314, lightning-hydra-template#289).
    """

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as err:
            message = user_error_message(err)
            if message is None:
                log.exception("The task failed; see the traceback above. Its output directory keeps the logs.")
                raise
            log.error("%s", message)
            raise SystemExit(1) from None
        finally:
            finish_wandb_run()

    return wrapped
