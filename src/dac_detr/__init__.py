"""dac-detr: DAC-DETR (Divide the Attention Layers and Conquer, NeurIPS 2023) for Lightning + Hydra."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `paths.root_dir` is the directory the command runs in. Hydra's `${hydra:runtime.cwd}` cannot be
# used there: a multirun resolves `hydra.sweep.dir` (which builds on paths.*) before the Hydra
# config of a job exists. Registered at import, before any entry point composes its config.
OmegaConf.register_new_resolver("dac_detr.cwd", os.getcwd, replace=True)
