"""The Hydra plugins that some sweeps need, checked before Hydra composes the config.

Without the plugin Hydra ends with "Could not find 'hydra/sweeper/optuna'", which does not say
that one `pip install` fixes it.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

# (what the command line asks for, the plugin's module, what it is)
_PLUGINS = (
    ("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "the Optuna sweeper (hydra-optuna-sweeper)"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "the Optuna sweeper (hydra-optuna-sweeper)"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "the SLURM launcher (hydra-submitit-launcher)"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "the SLURM launcher (hydra-submitit-launcher)"),
)


def missing_sweep_plugin(argv: Sequence[str]) -> Optional[str]:
    """The one-line message for the first plugin ``argv`` needs and that is not installed, or None."""
    for arg in argv:
        for asked, module, what in _PLUGINS:
            if not arg.lstrip("+").startswith(asked) or arg.endswith("=null"):
                continue
            try:
                importlib.import_module(module)
            except ImportError:
                return f"`{arg}` needs {what}, which is not installed: pip install \"dac-detr[sweep]\""
    return None
