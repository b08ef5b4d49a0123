"""W&B offline decision and the resume helpers (no network, no API key here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dac_detr.utils.checkpoint_io import atomic_torch_save
from dac_detr.utils.resume import find_last_checkpoint
from dac_detr.utils.wandb_utils import wandb_should_run_offline


def test_no_api_key_means_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    offline, reason = wandb_should_run_offline(False)
    assert offline and "API key" in reason


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_mode_wins(monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_should_run_offline(False) == (True, f"WANDB_MODE={mode}")


def test_requested_offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_should_run_offline(True) == (True, "logger.wandb.offline=true")


def _fake_run(root: Path, name: str, overrides: list[str]) -> Path:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    ckpt = root / name / "checkpoints" / "last.ckpt"
    atomic_torch_save({"epoch": 0}, ckpt)
    return ckpt


def test_last_checkpoint_of_the_run_with_the_same_overrides(tmp_path):
    mine = _fake_run(tmp_path, "runs/a", ["dac.o2m.topk=4", "seed=1"])
    _fake_run(tmp_path, "runs/b", ["dac.o2m.topk=6", "seed=1"])
    # ckpt_path / resume / max_epochs may differ between the killed run and its continuation
    found = find_last_checkpoint(tmp_path, ["seed=1", "dac.o2m.topk=4", "ckpt_path=last", "trainer.max_epochs=24"])
    assert found == mine
    assert find_last_checkpoint(tmp_path, ["dac.o2m.topk=8"]) is None


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"a": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"a": Unpicklable()}, target)
    import torch

    assert torch.load(target, weights_only=False) == {"a": 1}  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_resumed_run_reuses_the_wandb_run_id(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from dac_detr.utils.instantiate import build_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"logger": {"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p",
                                                 "name": None, "group": None, "save_dir": str(tmp_path),
                                                 "offline": False, "id": None}}})
    (logger,) = build_loggers(cfg, wandb_run_id="abc123", job={"name": "job", "group": "grp"})
    assert logger.version == "abc123"
    assert logger._wandb_init["resume"] == "allow" and logger._wandb_init["group"] == "grp"
    assert logger._offline is True
