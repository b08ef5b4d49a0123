"""EMA maths: the averaged weights after n optimizer steps equal the closed form.

With decay d, the first update copies the weights (n_averaged = 0) and every later one does
avg <- d * avg + (1 - d) * w, so after updates with weights w_1..w_n

    avg_n = d^(n-1) * w_1 + (1 - d) * sum_{k=2..n} d^(n-k) * w_k.

A tiny LightningModule records its weights after every optimizer step; the EMA callback's average
must match that sum to float64 precision, for the decay given and for the decay the config gives.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from dac_detr.utils.ema import EMA
from test_train_helpers import compose_train


class _Recorder(L.LightningModule):
    """A float64 linear layer trained by SGD on fixed random data; keeps its weights after every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 2).double()
        self.after_step: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.layer(x) - y) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # after this batch's optimizer step
        self.after_step.append(torch.cat([p.detach().flatten().clone() for p in self.layer.parameters()]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(ema: EMA, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(weights after each of ``steps`` optimizer steps, the EMA average at the end)."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
            for _ in range(steps)]
    module = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, callbacks=[ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    # Keep the average beside the model: at the end WeightAveraging copies it into the module.
    ema.on_train_end = lambda *args: None
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    average = torch.cat([p.detach().flatten() for p in ema._average_model.module.layer.parameters()])
    return module.after_step, average


def _closed_form(weights: list[torch.Tensor], decay: float) -> torch.Tensor:
    n = len(weights)
    return decay ** (n - 1) * weights[0] + sum((1 - decay) * decay ** (n - k) * weights[k - 1] for k in range(2, n + 1))


@pytest.mark.parametrize("decay", [0.9, 0.6])
def test_ema_after_n_steps_is_the_closed_form(decay):
    weights, average = _fit(EMA(decay=decay), steps=7)
    assert len(weights) == 7
    torch.testing.assert_close(average, _closed_form(weights, decay), rtol=0, atol=1e-12)
    # and it is not the raw weights nor the closed form of another decay
    assert not torch.allclose(average, weights[-1], atol=1e-6)
    assert not torch.allclose(average, _closed_form(weights, 0.5), atol=1e-6)


def test_start_step_and_every_n_steps():
    """Before ``start_step`` the average is the raw weights; then every ``every_n_steps``-th step
    (0-based optimizer step index divisible by it) is averaged in."""
    decay = 0.8
    weights, average = _fit(EMA(decay=decay, start_step=3, every_n_steps=2), steps=9)
    # steps 0, 1, 2: copies (the last copy, w after step 2, starts the average); then 4, 6, 8
    used = [weights[2], weights[4], weights[6], weights[8]]
    torch.testing.assert_close(average, _closed_form(used, decay), rtol=0, atol=1e-12)


def test_config_decay_reaches_the_callback(tmp_path):
    """``ema.decay`` of the config is the decay the callback averages with."""
    from dac_detr.utils.instantiate import build_callbacks

    cfg = compose_train(["ema.enabled=true", "ema.decay=0.75", f"paths.log_dir={tmp_path}"], output_dir=tmp_path)
    (ema,) = [c for c in build_callbacks(cfg, has_logger=False) if isinstance(c, EMA)]
    assert ema.decay == 0.75
    weights, average = _fit(ema, steps=5)
    torch.testing.assert_close(average, _closed_form(weights, 0.75), rtol=0, atol=1e-12)
    assert compose_train([f"paths.log_dir={tmp_path}"]).ema.decay == 0.9997  # the documented default
