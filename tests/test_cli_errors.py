"""User errors end the entry points with their message alone: no traceback, a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys


def run_module(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_missing_coco_root_prints_the_fix_without_a_traceback(tmp_path):
    result = run_module("dac_detr.train", ["experiment=r50_12ep", "trainer=cpu", "logger=none",
                                           f"paths.data_dir={tmp_path / 'nowhere'}", f"paths.log_dir={tmp_path}"],
                        cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"The data root {tmp_path / 'nowhere' / 'coco'} does not exist" in output
    assert "data=synthetic" in output
    assert "Traceback" not in output


def test_missing_checkpoint_for_evaluate_exits_1_without_a_traceback(tmp_path):
    result = run_module("dac_detr.evaluate", [f"ckpt={tmp_path / 'nope.ckpt'}", f"paths.log_dir={tmp_path}"],
                        cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "CheckpointError" in output and "nope.ckpt does not exist" in output
    assert "Traceback" not in output
