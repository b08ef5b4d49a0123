"""Shared test setup: CPU-only by default, small thread pools, Triton kernels interpreted on CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so it must be set before
# anything imports dac_detr.kernels. Without CUDA the kernels can only run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """GPU tests carry @pytest.mark.gpu and skip cleanly when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """The tiny detector after overfitting 15 synthetic images (tests/test_train_helpers.py,
    ``learning_overrides``): built once per session, read by the learning, evaluation and DDP tests."""
    from test_train_helpers import train_learned

    return train_learned(tmp_path_factory.mktemp("learned_run"))
