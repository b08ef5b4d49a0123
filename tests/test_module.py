"""DACDETRModule under bf16 autocast on the CPU (precision=bf16-mixed)."""

from __future__ import annotations

import math

from dac_detr.train import train
from test_train_helpers import compose_train, short_run_overrides, tiny_data_overrides


def test_bf16_mixed_training_and_validation_step(tmp_path):
    cfg = compose_train([*tiny_data_overrides(tmp_path / "data"), *short_run_overrides(tmp_path),
                         "trainer.precision=bf16-mixed"], output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/mAP"] <= 1.0


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
