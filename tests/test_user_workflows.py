"""What a new user meets outside the happy path: interrupts, crashes, wrong input, missing plugins, --help.

Each test reproduces a failure a trial run of the README found (a lost epoch, a deep traceback, an
unhelpful Hydra message) and checks the fix: the work is kept, and the message is one line that names
the problem and the fix, with exit code 1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import numpy as np
import torch

from dac_detr.data.synthetic import ensure_synthetic_coco
from dac_detr.train import train
from test_train_helpers import compose_train, run_cli, short_run_overrides, tiny_data_overrides

QUIET = ["logger=none", "~callbacks.progress_bar", "~callbacks.model_summary", "trainer=cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "set"
    ensure_synthetic_coco(root, num_train=16, num_val=8, image_size=64)
    return root


@pytest.fixture(scope="module")
def quickstart_ckpt(data_root, tmp_path_factory) -> Path:
    """A quickstart checkpoint after two steps."""
    logs = tmp_path_factory.mktemp("logs")
    cfg = compose_train([*tiny_data_overrides(data_root), *short_run_overrides(logs), "trainer.limit_train_batches=2"],
                        output_dir=logs / "run")
    train(cfg)
    return logs / "run" / "checkpoints" / "last.ckpt"


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# ---------------------------------------------------------------- interrupts and crashes keep the work


def test_sigterm_mid_epoch_saves_last_ckpt_and_the_printed_command_resumes(data_root, tmp_path):
    """SLURM's SIGTERM before preemption: last.ckpt at the current step (not the last epoch end), and
    the printed resume command continues the run to its end."""
    args = [*tiny_data_overrides(data_root), *QUIET, "trainer.max_epochs=1",
            "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "callbacks.step_checkpoint.every_n_train_steps=2",
            f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    process = subprocess.Popen([sys.executable, "-m", "dac_detr.train", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, last = time.time() + 300, None
    while time.time() < deadline and process.poll() is None and last is None:
        found = list((tmp_path / "logs").glob("**/checkpoints/last.ckpt"))
        last = found[0] if found else None
        time.sleep(0.05)
    assert last is not None, "no step checkpoint within the first epoch (callbacks.step_checkpoint)"
    steps_per_epoch = 16 // 2  # 16 training images, batch 2
    assert _step(last) == 2  # every 2 training steps, before the epoch ends
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM  # stopped, not finished
    stopped_at = _step(last)
    assert 2 <= stopped_at < steps_per_epoch, stopped_at
    match = re.search(r"Resume with:\n\s+(python -m dac_detr\.train .*ckpt_path=\S+)", output)
    assert match, output[-3000:]
    assert "Traceback" not in output

    resume = match.group(1).split()
    assert resume[-1] == f"ckpt_path={last}"
    result = run_cli("dac_detr.train", [a.strip("'") for a in resume[3:]], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert _step(last) == steps_per_epoch  # the resumed run finished the epoch, in the same folder


def test_a_crash_in_validation_keeps_the_epochs_weights(data_root, tmp_path):
    """A corrupt val image breaks validation after a whole epoch of training: last.ckpt has that epoch."""
    broken = tmp_path / "set"
    import shutil

    shutil.copytree(data_root, broken)
    first_val = sorted((broken / "val2017").iterdir())[0]
    first_val.write_bytes(b"\xff\xd8 not a jpeg")
    args = [*tiny_data_overrides(broken), *QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=3",
            "trainer.num_sanity_val_steps=0", f"paths.log_dir={tmp_path / 'logs'}"]
    result = run_cli("dac_detr.train", args, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    (last,) = (tmp_path / "logs").glob("**/checkpoints/last.ckpt")
    assert _step(last) == 3  # the epoch's three steps are kept
    assert "Resume with:" in output and first_val.name in output, output[-3000:]


# ---------------------------------------------------------------- one clear line for user errors


def _one_clear_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for text in expected:
        assert text in output, (text, output[-3000:])
    return output


def test_evaluate_without_ckpt_names_the_argument(tmp_path):
    result = run_cli("dac_detr.evaluate", [f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=120)
    _one_clear_line(result, "ckpt", "ckpt=")


def test_resuming_a_checkpoint_of_another_model_lists_what_differs(quickstart_ckpt, data_root, tmp_path):
    args = [*tiny_data_overrides(data_root), *QUIET, "model.num_queries=20", f"ckpt_path={quickstart_ckpt}",
            f"paths.log_dir={tmp_path}"]
    output = _one_clear_line(run_cli("dac_detr.train", args, cwd=tmp_path, timeout=300), "another model",
                             "init_from=")
    assert "query" in output and "(30," in output and "(20," in output  # which tensor, which shapes


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=abc", ["data.batch_size", "'abc'"]),
        ("+trainer.max_epoch=1", ["trainer.max_epoch", "max_epochs"]),  # the closest valid argument
        ("+data.num_trian=4", ["data.num_trian", "num_train"]),
    ],
)
def test_wrong_arguments_end_in_one_line_with_the_fix(override, expected, data_root, tmp_path):
    args = [*tiny_data_overrides(data_root), *QUIET, override, f"paths.log_dir={tmp_path}"]
    _one_clear_line(run_cli("dac_detr.train", args, cwd=tmp_path, timeout=300), *expected)


def test_offline_backbone_weights_are_one_clear_line(data_root, tmp_path):
    """experiment=r50_12ep with no network (a dead proxy) and an empty torch cache: the error names the file."""
    args = ["experiment=r50_12ep", *tiny_data_overrides(data_root, 128), *QUIET, f"paths.log_dir={tmp_path}"]
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    output = _one_clear_line(run_cli("dac_detr.train", args, cwd=tmp_path, timeout=300, env=env),
                             "resnet50", "backbone.pretrained=")
    assert len([line for line in output.splitlines() if "ERROR" in line]) == 1


def test_a_missing_sweep_plugin_is_one_line_naming_the_extra(monkeypatch, capsys):
    import dac_detr.train as train_module

    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_optuna_sweeper", None)  # as if not installed
    monkeypatch.setattr(sys, "argv", ["dac_detr.train", "-m", "hparams_search=dac_o2m"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "dac-detr[sweep]"' in err and "hparams_search" in err


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("entry", ["train", "evaluate", "predict", "export"])
def test_help_says_what_the_command_does_with_three_examples(entry, tmp_path):
    result = run_cli(f"dac_detr.{entry}", ["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0].startswith(f"dac_detr.{entry}: "), lines[:3]
    assert sum(f"python -m dac_detr.{entry}" in line for line in lines[1:6]) >= 3, lines[:6]


# ---------------------------------------------------------------- warnings a user needs, once


def test_more_objects_than_queries_is_one_warning(data_root, tmp_path, caplog):
    from dac_detr.train import warn_if_more_objects_than_queries
    from dac_detr.utils.instantiate import build_datamodule

    cfg = compose_train([*tiny_data_overrides(data_root), *short_run_overrides(tmp_path)], output_dir=tmp_path)
    datamodule = build_datamodule(cfg, "fit")
    counts = np.diff(datamodule.dataset("train").split.offsets)
    with caplog.at_level("WARNING", logger="dac_detr"):
        warn_if_more_objects_than_queries(datamodule, int(counts.max()))  # enough queries: silent
        assert not caplog.records
        warn_if_more_objects_than_queries(datamodule, int(counts.max()) - 1)
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert f"{int((counts > counts.max() - 1).sum())} training images" in record.message
    assert f"Raise model.num_queries above {int(counts.max())}" in record.message


@pytest.mark.parametrize("content, expected", [(None, "does not exist"), (b"not a checkpoint", "could not read")])
def test_the_official_checkpoint_converter_fails_in_one_line(content, expected, tmp_path):
    source = tmp_path / "official.pth"
    if content is not None:
        source.write_bytes(content)
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_official.py"
    result = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "ours.pth")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    _one_clear_line(result, expected, str(source))
    assert not (tmp_path / "ours.pth").exists()
