"""Shared helpers of the training-application tests (compose real configs, shrink them for the CPU).

Named test_train_helpers.py so it sits with the tests it serves; it holds no tests itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
COCO_EXPERIMENTS = [e for e in EXPERIMENTS if e != "quickstart"]


def tiny_data_overrides(data_root: Path, size: int = 64) -> list[str]:
    """The synthetic set at its smallest: 16 train / 8 val images of 64 px, fed at ``size`` px
    (the official model's 900 two-stage proposals need >= 900 encoder tokens: size 224),
    batch 2, no workers."""
    return [
        "data=synthetic",
        f"data.root={data_root}",
        "data.num_train=16",
        "data.num_val=8",
        "data.image_size=64",
        f"data.train_scales=[{size}]",
        f"data.train_max_size={size * 3 // 2}",
        "data.crop_resize_scales=[56]",
        "data.crop_min_size=48",
        "data.crop_max_size=56",
        f"data.val_size={size}",
        f"data.val_max_size={size * 3 // 2}",
        "data.batch_size=2",
        "data.num_workers=0",
    ]


def short_run_overrides(log_dir: Path) -> list[str]:
    """CPU, a couple of batches, no sanity pass, logs under ``log_dir``."""
    return [
        "trainer=cpu",
        "trainer.devices=1",
        f"paths.log_dir={log_dir}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "logger=none",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "module.num_log_images=0",
    ]


def compose_train(overrides: list[str], output_dir: Path | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config with the real Hydra, with the hydra node set up as in a run."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dac_detr.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.runtime.cwd = str(output_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def run_cli(module: str, args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a fresh process (the real CLI, Hydra included)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def wandb_run_contents(run_dir: Path) -> dict:
    """What an offline W&B run wrote into its ``run-<id>.wandb`` file.

    Recent wandb versions keep everything of an offline run in that one record log (no
    wandb-summary.json until synced); it is a LevelDB-style log: a 7-byte file header, then records
    with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks, each record a
    ``wandb_internal_pb2.Record`` protobuf.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (log_file,) = Path(run_dir).glob("run-*.wandb")
    data = log_file.read_bytes()
    assert data[:4] == b":W&B", f"{log_file} is not a W&B record log"
    pos, pending, raw_records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block never starts a record header in its last 6 bytes
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            raw_records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            raw_records.append(pending + chunk)
            pending = b""
    out = {"run_id": None, "group": None, "name": None, "history": set(), "config": set(), "exit": False}
    for raw in raw_records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=record.run.run_id, group=record.run.run_group, name=record.run.display_name)
            out["config"] |= {item.key or "/".join(item.nested_key) for item in record.run.config.update}
        elif kind == "config":
            out["config"] |= {item.key or "/".join(item.nested_key) for item in record.config.update}
        elif kind == "history":
            out["history"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "exit":
            out["exit"] = True
    return out


# ---------------------------------------------------------------------------- a run that has learned
# The quickstart detector (tiny DAC-DETR, r18 from scratch, two-stage, box refinement, CDN, DAC)
# overfitting 15 synthetic 64 px images: 32 epochs of 3 batches of 5 = 96 steps, no augmentation
# (every train size is 64 px, the crop keeps the whole image, no flip) and validation on those
# same 15 images (the train split is also the val split). 15 is odd on purpose: split over 2 DDP
# ranks, one image is repeated and the evaluator must drop the copy. EMA on (decay 0.9).
LEARNING_EPOCHS = 32
LEARNING_IMAGES = 15


def learning_overrides(root: Path) -> list[str]:
    """Overrides of the learning run (see above); logs and data under ``root``."""
    return [
        "data=synthetic", f"data.root={root / 'data'}", f"data.num_train={LEARNING_IMAGES}", "data.num_val=2",
        "data.image_size=64", "data.train_scales=[64]", "data.train_max_size=96", "data.crop_resize_scales=[64]",
        "data.crop_min_size=64", "data.crop_max_size=64", "data.hflip_prob=0.0", "data.val_size=64",
        "data.val_max_size=96", "data.batch_size=5", "data.num_workers=0",
        "+data.val_annotations=annotations/instances_train2017.json", "+data.val_images=train2017",
        "trainer=cpu", "trainer.devices=1", f"paths.log_dir={root / 'logs'}", f"trainer.max_epochs={LEARNING_EPOCHS}",
        f"trainer.check_val_every_n_epoch={LEARNING_EPOCHS}", "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "logger=csv", "~callbacks.progress_bar",
        "~callbacks.model_summary", "module.num_log_images=0", "optimizer.lr=1e-3", "module.lr_backbone=1e-3",
        "scheduler.step_size=1000", "ema.enabled=true", "ema.decay=0.9",
    ]


@dataclass
class LearnedRun:
    """A finished learning run: its last.ckpt, final metrics, per-step logged values, data root."""

    ckpt: Path
    metrics: dict
    steps: list[dict[str, float]]  # one dict per training step: the train/* values logged at it
    data_root: Path
    overrides: list[str]
    seconds: float

    def epoch_mean(self, key: str, epoch: int) -> float:
        """Mean of ``train/<key>`` over the steps of ``epoch`` (negative: counted from the end)."""
        per_epoch = len(self.steps) // LEARNING_EPOCHS
        epoch = epoch % LEARNING_EPOCHS
        values = [s[f"train/{key}"] for s in self.steps[epoch * per_epoch:(epoch + 1) * per_epoch]]
        return sum(values) / len(values)


def train_learned(root: Path) -> LearnedRun:
    """Run the learning configuration (about a minute on one CPU core) and read back what it logged."""
    import csv
    import time

    from dac_detr.train import train

    overrides = learning_overrides(root)
    cfg = compose_train(overrides, output_dir=root / "run")
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    with open(root / "run" / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    steps = [{k: float(v) for k, v in r.items() if k.startswith("train/") and v} for r in rows]
    for step in steps:
        step["train/loss"] = step.pop("train/loss_step")
    return LearnedRun(root / "run" / "checkpoints" / "last.ckpt", metrics, steps, root / "data", overrides, seconds)


def start_and_kill(args: list[str], log_dir: Path, cwd: Path, at_global_step: int, timeout: float = 600) -> Path:
    """Start ``python -m dac_detr.train args`` and SIGKILL it as soon as a ``last.ckpt`` under
    ``log_dir`` holds ``at_global_step`` or more; returns that checkpoint. Fails if the run ends
    first (the kill must interrupt it)."""
    import signal
    import time

    import torch

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dac_detr.train", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env)
    deadline, seen = time.time() + timeout, None
    try:
        while time.time() < deadline and process.poll() is None:
            found = list(log_dir.glob("**/checkpoints/last.ckpt"))
            if found and found[0].stat().st_mtime_ns != seen:
                seen = found[0].stat().st_mtime_ns  # written atomically (AtomicCheckpointIO): always whole
                if torch.load(found[0], map_location="cpu", weights_only=False)["global_step"] >= at_global_step:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == -signal.SIGKILL, f"the run ended (rc {code}) before it was killed: {process.stderr.read().decode()[-3000:]}"
    return found[0]
