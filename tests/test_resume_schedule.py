"""Kill a run after its StepLR drop, with EMA on, resume it: everything a run carries equals an
uninterrupted run's (raw and EMA weights, AdamW moments, the scheduler, the EMA step counter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_train_helpers import run_cli, start_and_kill, tiny_data_overrides

BATCHES = 2  # training batches per epoch
EPOCHS = 5  # StepLR(step_size=2): x0.1 after the 2nd and the 4th epoch; the kill comes after the 3rd
# (the last.ckpt of a validation is written before that epoch's scheduler step)
BASE_LR = 2e-4


def _common(data_root: Path) -> list[str]:
    return [*tiny_data_overrides(data_root), "trainer=cpu", f"trainer.max_epochs={EPOCHS}",
            f"trainer.limit_train_batches={BATCHES}", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "logger=none", "~callbacks.progress_bar", "~callbacks.model_summary", f"optimizer.lr={BASE_LR}",
            "scheduler.step_size=2", "ema.enabled=true", "ema.decay=0.7"]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_equal(expected, got, where: str) -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            _assert_equal(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            _assert_equal(a, b, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got), where
    else:
        assert expected == got, where


@pytest.mark.timeout(900)
def test_resume_after_the_lr_drop_with_ema_matches_an_uninterrupted_run(tmp_path):
    data_root = tmp_path / "data"
    killed_logs, straight_logs = tmp_path / "killed", tmp_path / "straight"
    args = [*_common(data_root), f"paths.log_dir={killed_logs}"]
    last = start_and_kill(args, killed_logs, cwd=tmp_path, at_global_step=3 * BATCHES)
    at_kill = _load(last)
    assert at_kill["global_step"] == 3 * BATCHES and at_kill["epoch"] == 2
    # killed in the 4th epoch: after the first drop, before the second
    assert at_kill["lr_schedulers"][0]["_last_lr"][-1] == pytest.approx(BASE_LR * 0.1)
    assert not torch.equal(at_kill["state_dict"]["model.class_embed.0.weight"],
                           at_kill["current_model_state"]["model.class_embed.0.weight"])  # EMA differs from raw

    resumed = run_cli("dac_detr.train", [*args, "ckpt_path=last"], cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_cli("dac_detr.train", [*_common(data_root), f"paths.log_dir={straight_logs}"], cwd=tmp_path, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (straight_last,) = straight_logs.glob("**/checkpoints/last.ckpt")
    expected, got = _load(straight_last), _load(last)

    assert got["global_step"] == expected["global_step"] == EPOCHS * BATCHES
    assert expected["lr_schedulers"][0]["_last_lr"][-1] == pytest.approx(BASE_LR * 0.01)  # both drops passed
    _assert_equal(expected["current_model_state"], got["current_model_state"], "raw weights")
    _assert_equal(expected["state_dict"], got["state_dict"], "EMA weights")
    _assert_equal(expected["averaging_state"], got["averaging_state"], "EMA n_averaged")
    _assert_equal(expected["optimizer_states"], got["optimizer_states"], "optimizer")
    _assert_equal(expected["lr_schedulers"], got["lr_schedulers"], "scheduler")
    ema_state = {k: v for k, v in expected["callbacks"].items() if k.startswith("EMA")}
    assert ema_state, sorted(expected["callbacks"])
    _assert_equal(ema_state, {k: got["callbacks"][k] for k in ema_state}, "EMA callback")
