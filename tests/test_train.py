"""The training application end to end on the CPU: every experiment steps, the CLI, multirun + W&B,
DDP simulated with 2 processes, and kill-and-resume."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dac_detr.train import train
from dac_detr.utils.checkpoint import detector_state_dict
from test_train_helpers import (
    COCO_EXPERIMENTS,
    LEARNING_IMAGES,
    compose_train,
    run_cli,
    short_run_overrides,
    tiny_data_overrides,
)

# The COCO experiments keep their real backbones (R50, Swin-L) and widths (d=256, FFN 2048, 8 heads,
# 4 levels, two-stage, box refinement, CDN, DAC) but run 1 encoder + 2 decoder layers, 50 queries and
# 5 DN groups on 128 px synthetic images, so one step of each of the 12 fits a CPU test.
SMALL_QUERY_OVERRIDES = ["backbone.pretrained=null", "model.num_queries=50", "model.dn_number=5",
                         "model.num_encoder_layers=1", "model.num_decoder_layers=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


# `swin_l` runs the real Swin-L (depths 2-2-18-2, 195 M parameters); its variants, which differ from it
# only in schedule/loss/DAC values, use depths 2-2-2-2 to keep the suite fast.
SWIN_REDUCED_DEPTH = ["backbone.depths=[2,2,2,2]"]


@pytest.mark.parametrize(
    "experiment", [pytest.param(e, marks=pytest.mark.slow) if e.startswith("swin_l") else e for e in COCO_EXPERIMENTS]
)
def test_experiment_runs_a_training_and_a_validation_step(experiment, data_root, tmp_path):
    extra = SWIN_REDUCED_DEPTH if experiment.startswith("swin_l") and experiment != "swin_l" else []
    cfg = compose_train(
        [f"experiment={experiment}", *tiny_data_overrides(data_root, 128), *short_run_overrides(tmp_path),
         *SMALL_QUERY_OVERRIDES, *extra],
        output_dir=tmp_path / "run",
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["val/mAP"] <= 1.0
    # every loss term of the active branches was logged under train/
    assert any(k.startswith("train/loss_o2o_cls_") for k in metrics)
    assert any(k.startswith("train/loss_o2m_cls_") for k in metrics) == (not experiment.endswith("_baseline"))
    assert any(k.startswith("train/loss_dn_o_") for k in metrics) and "train/loss_enc_cls" in metrics
    assert "val/queries_per_object@0.6" in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_quickstart_module_logs_streams_and_optimizer_groups(data_root, tmp_path):
    cfg = compose_train([*tiny_data_overrides(data_root), *short_run_overrides(tmp_path), "logger=csv"],
                        output_dir=tmp_path / "run")
    metrics = train(cfg)
    for stream in ("loss_o2o", "loss_o2m", "loss_dn_o", "loss_dn_c", "loss_enc"):
        assert f"train/{stream}" in metrics
    assert any(k.startswith("train/stat_") for k in metrics)
    for key in ("val/mAP", "val/mAP_50", "val/mAP_75", "val/mAP_s", "val/mAP_m", "val/AR_100",
                "val/queries_per_object@0.7", "val/queries_per_object@0.8"):
        assert key in metrics
    assert any(k.startswith("val/AP/") for k in metrics)  # per-class AP
    csv = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    # LearningRateMonitor: one curve per optimizer group (backbone, sampling offsets, rest)
    assert {"lr-AdamW/backbone", "lr-AdamW/linear_proj", "lr-AdamW/rest"} <= set(csv.split(","))


def test_optimizer_groups_follow_the_official_recipe(data_root, tmp_path):
    from dac_detr.utils.instantiate import build_datamodule, build_module

    cfg = compose_train([*tiny_data_overrides(data_root), *short_run_overrides(tmp_path), "optimizer.lr=2e-4",
                         "module.lr_backbone=2e-5", "scheduler.step_size=11"], output_dir=tmp_path)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_classes)
    config = module.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(2e-5)
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert groups["rest"]["lr"] == pytest.approx(2e-4)
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in groups.values())
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all("sampling_offsets" in names[id(p)] for p in groups["linear_proj"]["params"])
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"]["params"])
    scheduler = config["lr_scheduler"]
    assert scheduler["interval"] == "epoch" and scheduler["scheduler"].step_size == 11


def _state(path: Path) -> dict[str, torch.Tensor]:
    return detector_state_dict(torch.load(path, map_location="cpu", weights_only=False))


def test_kill_and_resume_matches_an_uninterrupted_run(data_root, tmp_path):
    """SIGKILL a run during its second epoch, resume with ckpt_path=last: same weights at the end."""
    common = [*tiny_data_overrides(data_root), "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "logger=none",
              "~callbacks.progress_bar", "~callbacks.model_summary"]
    killed_logs, straight_logs = tmp_path / "killed", tmp_path / "straight"
    args = [*common, f"paths.log_dir={killed_logs}"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dac_detr.train", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**__import__("os").environ, **env})
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and process.poll() is None:
        found = list(killed_logs.glob("**/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.05)
    assert last is not None, process.stderr.read().decode()[-3000:] if process.poll() is not None else "no checkpoint"
    process.send_signal(signal.SIGKILL)  # in epoch 1 of 2: the first checkpoint has just been written
    assert process.wait() == -signal.SIGKILL
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2  # after epoch 0

    resumed = run_cli("dac_detr.train", [*args, "ckpt_path=last"], cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4  # the resumed run finished, writing into the same folder

    # The uninterrupted run also in a fresh process: same thread count, so the same float reductions.
    straight = run_cli("dac_detr.train", [*common, f"paths.log_dir={straight_logs}"], cwd=tmp_path, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (straight_last,) = straight_logs.glob("**/checkpoints/last.ckpt")
    expected = _state(straight_last)
    got = _state(last)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path):
    result = run_cli("dac_detr.train", ["resume=true", f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "no last.ckpt of a run with the same overrides" in result.stdout + result.stderr


def test_ddp_sim_fit_gathers_validation_metrics(learned_run, tmp_path):
    """2 CPU processes validate a detector that has learned (``learned_run``) on 15 images: 8 per
    rank, so Lightning's sampler repeats one and the evaluator must count it once. val/mAP is
    computed once over both ranks' images and equals a 1-process evaluation of the same weights."""
    from dac_detr.evaluate import evaluate

    assert LEARNING_IMAGES % 2 == 1  # the uneven split this test is about
    # One training step from the learned weights at a vanishing learning rate, then validation of all 15.
    cfg = compose_train(
        [*(o for o in learned_run.overrides if not o.startswith("trainer=") and not o.startswith("trainer.devices=")),
         f"paths.log_dir={tmp_path}", "trainer=ddp_sim", "trainer.max_epochs=1",
         "trainer.check_val_every_n_epoch=1", "trainer.limit_train_batches=1", "logger=none", "ema.enabled=false",
         "optimizer.lr=1e-12", "module.lr_backbone=0", f"init_from={learned_run.ckpt}", "data.val_batch_size=3"],
        output_dir=tmp_path / "run",
    )
    assert (cfg.trainer.devices, cfg.trainer.strategy) == (2, "ddp_spawn")
    metrics = train(cfg)
    assert metrics["val/mAP"] > 0.3, metrics["val/mAP"]  # learned: duplicates would cost precision
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    eval_cfg = compose_train([f"ckpt={ckpt}", f"paths.log_dir={tmp_path}"], output_dir=tmp_path / "eval", config_name="eval")
    single = evaluate(eval_cfg)
    assert metrics["val/mAP"] == pytest.approx(single["mAP"], abs=1e-6)
    assert metrics["val/AR_100"] == pytest.approx(single["AR_100"], abs=1e-6)
    assert metrics["val/mAP_50"] == pytest.approx(single["mAP_50"], abs=1e-6)
