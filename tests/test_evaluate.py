"""evaluate / predict / export on the checkpoint of a run that has learned (EMA on)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dac_detr.evaluate import evaluate
from dac_detr.export import export_checkpoint
from test_train_helpers import compose_train, run_cli


@pytest.fixture(scope="module")
def trained(learned_run):
    """The run that has learned (tests/conftest.py, EMA on, validated on its 15 training images):
    (last.ckpt, final metrics, data root)."""
    return learned_run.ckpt, learned_run.metrics, learned_run.data_root


def _eval_cfg(ckpt: Path, tmp_path: Path, *extra: str):
    return compose_train([f"ckpt={ckpt}", f"paths.log_dir={tmp_path}", *extra], output_dir=tmp_path / "eval",
                         config_name="eval")


def test_checkpoint_carries_config_ema_and_class_names(trained):
    ckpt, _, _ = trained
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    metadata = checkpoint["dac_detr"]
    assert metadata["config"]["model"]["_target_"].endswith("DACDETR")
    assert len(metadata["class_names"]) == len(metadata["category_ids"]) == 6
    # Lightning's WeightAveraging: EMA weights in state_dict, the raw ones beside them
    raw, ema = checkpoint["current_model_state"], checkpoint["state_dict"]
    key = "model.class_embed.0.weight"
    assert not torch.equal(raw[key], ema[key])


def _as_logged(value: float) -> float:
    """A float as Lightning's ``self.log`` stores it (a float32 tensor), back as a Python float."""
    return torch.tensor(value, dtype=torch.float32).item()


def test_evaluate_reproduces_the_validation_of_training(trained, tmp_path):
    ckpt, metrics, _ = trained
    result = evaluate(_eval_cfg(ckpt, tmp_path))
    assert metrics["val/mAP"] > 0.3  # a detector that has learned: a wrong box or label would show
    # training validated the EMA weights; the checkpoint's state_dict holds them. Lightning logs a
    # Python float as a float32 tensor, so evaluate's float64 value rounded to float32 must be the
    # logged one exactly (one detection more or less moves mAP by far more than a float32 step)
    assert _as_logged(result["mAP"]) == metrics["val/mAP"]
    assert _as_logged(result["AR_100"]) == metrics["val/AR_100"]
    assert result["mAP_50"] == pytest.approx(metrics["val/mAP_50"], abs=1e-6)
    assert result["per_class"] == pytest.approx({k[len("val/AP/"):]: v for k, v in metrics.items() if k.startswith("val/AP/")},
                                                abs=1e-6, nan_ok=True)
    detections = json.loads((tmp_path / "eval" / "detections_val.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])


def test_evaluate_cli_prints_the_coco_table(trained, tmp_path):
    ckpt, _, _ = trained
    result = run_cli("dac_detr.evaluate", [f"ckpt={ckpt}", f"paths.log_dir={tmp_path}", "postprocess=topk"],
                     cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.stdout
    assert "Per-class AP" in result.stdout and "Queries per object" in result.stdout


@pytest.mark.parametrize("module", ["dac_detr.evaluate", "dac_detr.predict", "dac_detr.export"])
def test_missing_checkpoint_is_a_clear_error(module, tmp_path):
    args = [f"ckpt={tmp_path / 'nope.ckpt'}", f"paths.log_dir={tmp_path}"]
    if module == "dac_detr.predict":
        args += [f"images={tmp_path}", f"out={tmp_path / 'out'}"]
    result = run_cli(module, args, cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "nope.ckpt does not exist" in output
    assert "site-packages" not in output


def test_predict_cli_writes_json_and_drawn_images(trained, tmp_path):
    ckpt, _, data_root = trained
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((next(data_root.glob("**/val2017"))).iterdir())[:2]
    for src in sources:
        shutil.copy(src, images / src.name)
    out = tmp_path / "out"
    result = run_cli("dac_detr.predict", [f"ckpt={ckpt}", f"images={images}", f"out={out}", "score_threshold=0.0",
                                          "max_detections=5", f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == 5 * len(sources)
    first = detections[0]
    assert {"file_name", "category_id", "class_name", "score", "bbox"} <= set(first)
    assert 0 <= first["bbox"][0] <= first["width"] and 0 <= first["bbox"][1] <= first["height"]
    from torchvision.io import decode_image

    for src in sources:
        drawn = next(out.glob(src.stem + ".*"))
        assert decode_image(str(drawn)).shape == decode_image(str(src)).shape


def test_export_keeps_only_inference_weights(trained, tmp_path):
    ckpt, _, _ = trained
    exported = export_checkpoint(ckpt, tmp_path / "model.pt", use_ema=True)
    payload = torch.load(exported, map_location="cpu", weights_only=False)
    assert set(payload) == {"model", "dac_detr"}  # no optimizer, scheduler, loops or criterion
    assert not any(k.startswith("label_enc") for k in payload["model"])  # no DN label book
    assert payload["dac_detr"]["ema"] is True
    assert payload["dac_detr"]["config"]["model"]["dac_enabled"] is False
    assert payload["dac_detr"]["config"]["model"]["dn_number"] == 0
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    key = "class_embed.0.weight"
    assert torch.equal(payload["model"][key], checkpoint["state_dict"]["model." + key])  # the EMA weights
    raw = export_checkpoint(ckpt, tmp_path / "raw.pt", use_ema=False)
    assert torch.equal(torch.load(raw, weights_only=False)["model"][key], checkpoint["current_model_state"]["model." + key])
    # the export evaluates exactly like the checkpoint (the C-Decoder and DN never touch inference)
    from_ckpt = evaluate(_eval_cfg(ckpt, tmp_path / "a"))
    from_export = evaluate(_eval_cfg(exported, tmp_path / "b"))
    assert from_export["mAP"] == pytest.approx(from_ckpt["mAP"], abs=1e-9)
