"""Shared helpers of the training-application tests (compose real configs, shrink them for the CPU).

Named test_train_helpers.py so it sits with the tests it serves; it holds no tests itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
