"""predict: the evaluator's detections, never writing over an input, surviving unreadable images,
drawings readable at any size."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dac_detr.deploy.drawing import class_colour, draw_detections
from dac_detr.evaluate import evaluate
from dac_detr.predict import predict
from test_train_helpers import compose_train, short_run_overrides, tiny_data_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart model trained for two steps; returns (last.ckpt, data root)."""
    from dac_detr.train import train

    root = tmp_path_factory.mktemp("predict_run")
    cfg = compose_train(
        [*tiny_data_overrides(root / "data"), *short_run_overrides(root / "logs"), "trainer.limit_train_batches=2"],
        output_dir=root / "run",
    )
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt", root / "data"


def _val_images(data_root: Path) -> Path:
    return next(data_root.glob("**/val2017"))


def _predict(tmp_path: Path, *args: str):
    cfg = compose_train([*args, f"paths.log_dir={tmp_path}"], output_dir=tmp_path / "predict_run", config_name="predict")
    return predict(cfg)


def test_predict_gives_the_evaluators_detections(trained, tmp_path):
    """Same checkpoint, same val images: predict's detections.json = evaluate's COCO results."""
    ckpt, data_root = trained
    eval_cfg = compose_train([f"ckpt={ckpt}", f"paths.log_dir={tmp_path}"],
                             output_dir=tmp_path / "eval", config_name="eval")
    evaluate(eval_cfg)
    evaluated = json.loads((tmp_path / "eval" / "detections_val.json").read_text())
    annotations = json.loads(next(data_root.glob("**/instances_val2017.json")).read_text())
    file_of = {im["id"]: im["file_name"] for im in annotations["images"]}

    rows = _predict(tmp_path, f"ckpt={ckpt}", f"images={_val_images(data_root)}", f"out={tmp_path / 'out'}",
                    "score_threshold=0.0", "max_detections=1000", "batch_size=2", "device=cpu", "draw=false")
    by_image: dict[str, list] = {}
    for r in evaluated:
        by_image.setdefault(file_of[r["image_id"]], []).append(r)
    predicted: dict[str, list] = {}
    for r in rows:
        predicted.setdefault(r["file_name"], []).append(r)
    assert set(predicted) == set(by_image) == set(file_of.values())
    for name, expected in by_image.items():
        got = predicted[name]
        assert len(got) == len(expected), name
        key = lambda r: (-r["score"], r["category_id"], r["bbox"])  # noqa: E731
        for a, b in zip(sorted(got, key=key), sorted(expected, key=key)):
            assert a["category_id"] == b["category_id"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)


def test_out_equal_to_images_is_refused_and_inputs_stay(trained, tmp_path, caplog):
    ckpt, data_root = trained
    images = tmp_path / "photos"
    images.mkdir()
    for src in sorted(_val_images(data_root).iterdir())[:2]:
        shutil.copy(src, images / src.name)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    with caplog.at_level(logging.ERROR, logger="dac_detr"), pytest.raises(SystemExit) as exit_info:
        _predict(tmp_path, f"ckpt={ckpt}", f"images={images}", f"out={images}", "device=cpu")
    assert exit_info.value.code == 1
    assert "holds input images" in caplog.text and "Choose another folder" in caplog.text
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # nothing written, nothing changed
    # a glob that picks an image inside `out` is refused too
    with pytest.raises(SystemExit):
        _predict(tmp_path, f"ckpt={ckpt}", f"images={images}/*.jpg", f"out={images}", "device=cpu", "draw=false")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_a_corrupt_image_is_skipped_by_name_and_the_rest_written(trained, tmp_path, caplog):
    ckpt, data_root = trained
    images = tmp_path / "photos"
    images.mkdir()
    good = sorted(_val_images(data_root).iterdir())[:2]
    for src in good:
        shutil.copy(src, images / src.name)
    (images / "zz_broken.jpg").write_bytes(good[0].read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="dac_detr"):
        rows = _predict(tmp_path, f"ckpt={ckpt}", f"images={images}", f"out={out}", "score_threshold=0.0",
                        "max_detections=3", "device=cpu")
    assert "zz_broken.jpg" in caplog.text
    written = json.loads((out / "detections.json").read_text())
    assert written == rows and {r["file_name"] for r in rows} == {p.name for p in good}
    assert [s["file_name"] for s in json.loads((out / "skipped.json").read_text())] == ["zz_broken.jpg"]
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(p.name for p in good)

    # strict=true: the run stops with the file's name, exit code 1, and the detections so far are kept
    strict_out = tmp_path / "strict"
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dac_detr"), pytest.raises(SystemExit) as exit_info:
        _predict(tmp_path, f"ckpt={ckpt}", f"images={images}", f"out={strict_out}", "score_threshold=0.0",
                 "max_detections=3", "device=cpu", "strict=true")
    assert exit_info.value.code == 1 and "zz_broken.jpg" in caplog.text
    assert {r["file_name"] for r in json.loads((strict_out / "detections.json").read_text())} == {p.name for p in good}


def test_drawings_scale_with_the_image_and_colour_by_class():
    colours = [class_colour(i) for i in range(91)]
    assert len(set(colours)) == 91  # one colour per class
    for side, min_line in ((64, 1), (1600, 5)):
        image = torch.zeros(3, side, side, dtype=torch.uint8)
        box = torch.tensor([[side * 0.25, side * 0.4, side * 0.75, side * 0.9]])
        drawn = draw_detections(image, box, [3], ["ring"], [0.9])
        assert drawn.shape == (side, side, 3)
        colour = np.array(class_colour(3))
        # the left edge of the box, half way down: a line of the class colour at least min_line wide
        row = drawn[int(side * 0.65)]
        on_line = np.all(row == colour, axis=-1)
        assert on_line.sum() >= 2 * min_line  # left and right edges
        # the label sits on a filled background of the class colour just above the box
        above = drawn[: int(side * 0.4), int(side * 0.25): int(side * 0.75)]
        filled = np.all(above == colour, axis=-1)
        assert filled.mean() > 0.005
        # a filled background, not just letters: some row has a long unbroken run of the colour
        longest = max(max((len(r) for r in "".join("1" if v else "0" for v in row).split("0")), default=0)
                      for row in filled)
        assert longest >= 0.05 * side


def test_model_equals_file_is_ckpt_on_the_command_line(trained, tmp_path):
    """`predict model=FILE` (the deployment guides' form) runs the file as ckpt=FILE would; both at once is refused."""
    from dac_detr.predict import model_file_alias
    from test_train_helpers import run_cli

    assert model_file_alias(["model=m.onnx", "images=a"]) == ["ckpt=m.onnx", "images=a"]
    assert model_file_alias(["ckpt=m.pth"]) == ["ckpt=m.pth"]
    ckpt, data_root = trained
    images = tmp_path / "photos"
    images.mkdir()
    shutil.copy(sorted(_val_images(data_root).iterdir())[0], images / "one.jpg")
    common = [f"images={images}", "device=cpu", "draw=false", "score_threshold=0.0", f"paths.log_dir={tmp_path}"]
    result = run_cli("dac_detr.predict", [f"model={ckpt}", f"out={tmp_path / 'out'}", *common], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "detections.json").read_text())  # the checkpoint ran
    both = run_cli("dac_detr.predict", [f"model={ckpt}", f"ckpt={ckpt}", f"out={tmp_path / 'out2'}", *common],
                   cwd=tmp_path, timeout=300)
    assert both.returncode == 1 and "give the checkpoint or ONNX file once, as ckpt=FILE" in both.stderr
