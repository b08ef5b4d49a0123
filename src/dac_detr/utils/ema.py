"""Exponential moving average of the weights, validated and exported when on.

Lightning >= 2.6 ships ``WeightAveraging`` (an ``AveragedModel`` kept beside the LightningModule).
While it is on, validation runs with the averaged weights, checkpoints store them under
``state_dict`` (the raw weights under ``current_model_state``) and, at the end of training, the
averaged weights are copied into the model. So evaluate/predict/export of a checkpoint use the EMA
weights without knowing about EMA at all.
"""

from __future__ import annotations

from typing import Optional

from torch.optim.swa_utils import get_ema_multi_avg_fn

try:  # Lightning >= 2.6
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - depends on the installed Lightning
    WeightAveraging = None


def _require_weight_averaging() -> None:
    if WeightAveraging is None:
        import lightning

        raise ImportError(
            f"ema.enabled=true needs lightning>=2.6 (lightning.pytorch.callbacks.WeightAveraging); "
            f"this environment has lightning {lightning.__version__}. Upgrade it with "
            "`pip install -U 'lightning>=2.6'` or run with ema.enabled=false."
        )


_Base = WeightAveraging if WeightAveraging is not None else object


class EMA(_Base):  # type: ignore[misc, valid-type]
    """EMA of the LightningModule's parameters and buffers: ``avg = decay * avg + (1 - decay) * w``.

    Args:
        decay: EMA decay per optimizer step (detrex uses 0.999, RT-DETR 0.9999).
        start_step: optimizer steps before the averaging starts (the average is the raw weights until then).
        every_n_steps: update the average every this many optimizer steps.
    """

    def __init__(self, decay: float = 0.9997, start_step: int = 0, every_n_steps: int = 1) -> None:
        _require_weight_averaging()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must lie in (0, 1), got {decay}; 0.999-0.9999 is usual.")
        if every_n_steps < 1:
            raise ValueError(f"ema.every_n_steps must be >= 1, got {every_n_steps}.")
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self.start_step = start_step
        self.every_n_steps = every_n_steps

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        if step_idx is None:
            return False
        if step_idx < self.start_step:
            # Before the averaging starts, the "average" follows the raw weights: with n_averaged = 0,
            # AveragedModel.update_parameters copies the current weights instead of averaging.
            self._average_model.n_averaged.zero_()
            return True
        return step_idx % self.every_n_steps == 0
