"""DACDETRModule under bf16 autocast on the CPU (precision=bf16-mixed), the optimizer it builds, torch.compile."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest

from dac_detr.train import train
from test_train_helpers import compose_train, short_run_overrides, tiny_data_overrides


def test_bf16_mixed_training_and_validation_step(tmp_path, caplog):
    """The quickstart (fused AdamW, gradient clipping) under bf16-mixed: Lightning cannot clip for a
    fused optimizer there, so the run falls back to the unfused AdamW and says so."""
    cfg = compose_train([*tiny_data_overrides(tmp_path / "data"), *short_run_overrides(tmp_path),
                         "trainer.precision=bf16-mixed"], output_dir=tmp_path / "run")
    assert cfg.optimizer.fused and cfg.trainer.gradient_clip_val > 0
    with caplog.at_level(logging.WARNING, logger="dac_detr"):
        metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/mAP"] <= 1.0
    assert "using the unfused AdamW" in caplog.text


@pytest.mark.parametrize("precision, clip, fused", [("32-true", 0.1, True), ("bf16-mixed", 0.1, False),
                                                    ("bf16-mixed", 0.0, True)])
def test_fused_adamw_only_where_lightning_can_clip_for_it(precision, clip, fused, tmp_path):
    from dac_detr.utils.instantiate import build_module

    cfg = compose_train([*tiny_data_overrides(tmp_path / "data")], output_dir=tmp_path / "run")
    module = build_module(cfg, 3)
    module.trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is fused


def test_compiled_detector_trains_and_validates(tmp_path):
    """`module.compile` runs the detector through torch.compile (here the aot_eager backend, which
    traces forward and backward with dynamo/AOTAutograd but generates no code, to stay fast on CPU)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = compose_train([*tiny_data_overrides(tmp_path / "data"), *short_run_overrides(tmp_path),
                         "module.compile=aot_eager"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/mAP"] <= 1.0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()
