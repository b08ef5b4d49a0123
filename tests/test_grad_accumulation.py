"""Gradient accumulation: every micro-batch draws its CDN noise and one-to-many subsampling from a
generator of its own, not the one of the optimizer step it is accumulated into."""

from __future__ import annotations

import pytest

from dac_detr.module import DACDETRModule
from dac_detr.train import train
from test_train_helpers import compose_train, short_run_overrides, tiny_data_overrides


@pytest.fixture
def recorded_seeds(monkeypatch):
    """The initial seed of every generator the training steps use, in order."""
    seeds: list[tuple[int, int]] = []
    original = DACDETRModule.step_generator

    def recording(self, *args, **kwargs):
        generator = original(self, *args, **kwargs)
        seeds.append((self.global_step, generator.initial_seed()))
        return generator

    monkeypatch.setattr(DACDETRModule, "step_generator", recording)
    return seeds


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_every_micro_batch_has_its_own_seed(accumulate, recorded_seeds, tmp_path):
    batches = 6  # 6 micro-batches per epoch, 2 epochs
    cfg = compose_train([*tiny_data_overrides(tmp_path / "data"), *short_run_overrides(tmp_path),
                         f"trainer.accumulate_grad_batches={accumulate}", f"trainer.limit_train_batches={batches}",
                         "trainer.max_epochs=2", "trainer.limit_val_batches=0", "seed=7", "data.batch_size=1"],
                        output_dir=tmp_path / "run")
    train(cfg)
    steps = [step for step, _ in recorded_seeds]
    seeds = [seed for _, seed in recorded_seeds]
    assert len(seeds) == 2 * batches
    # micro-batches of one optimizer step share global_step but not their seed
    assert steps == [i // accumulate for i in range(2 * batches)]
    assert len(set(seeds)) == len(seeds), f"seeds repeat under accumulate_grad_batches={accumulate}: {seeds}"
    # seed + global_step * A + (batch_idx % A) on one process: consecutive micro-batches
    assert seeds == [7 + i for i in range(2 * batches)]
