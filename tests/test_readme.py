"""The README is a contract: every command in its ```bash blocks runs as typed.

Each command is run the way a new user would type it, from a fresh directory outside the checkout,
with only work-shrinking overrides appended (epochs, steps, data and image size) and never ones that
change where things go or which code runs (no ``paths.*``, ``hydra.*``, ``ckpt*``). Placeholders the
README asks the reader to fill (``PATH``, ``DIR``) are filled with what the earlier commands made,
in README order, as a user's session would.

Commands that need what CI cannot have (COCO on disk, several GPUs, a SLURM cluster, downloaded
weights) are listed in ``NEEDS`` with the reason. For each of them the exact overrides still
compose (every job of a sweep), and the first training step runs on the synthetic data with those
overrides plus the listed swaps and the shrink.

A command added to the README without a case here fails ``test_every_readme_command_has_a_case``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from dac_detr.train import train
from test_train_helpers import compose_train

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Appended to every as-typed training command: shrink the work, nothing else.
SHRINK_TRAIN = [
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0", "data.num_train=16", "data.num_val=8", "data.batch_size=2",
]
# For the first step of a COCO-scale command on the synthetic data: the real backbone and widths,
# fewer layers/queries, 128 px (as tests/test_train.py), one step, no validation.
SHRINK_COCO = [
    "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0", "data.batch_size=2", "data.num_workers=0",
    "model.num_queries=50", "model.dn_number=5", "model.num_encoder_layers=1", "model.num_decoder_layers=2",
    "backbone.depths=[2,2,2,2]",  # Swin-L only (removed below for ResNets)
]
SYNTHETIC_128 = [
    "data=synthetic", "data.num_train=8", "data.num_val=4", "data.image_size=64", "data.train_scales=[128]",
    "data.train_max_size=192", "data.crop_resize_scales=[56]", "data.crop_min_size=48", "data.crop_max_size=56",
    "data.val_size=128", "data.val_max_size=192",
]
FORBIDDEN_PREFIXES = ("paths.", "hydra.", "hydra/", "ckpt", "init_from", "task_name")


def readme_commands() -> list[str]:
    """Every shell command of the README's ```bash blocks, comments dropped, one string each."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(" ".join(w if w in ("&&", "||", "|") else shlex.quote(w) for w in words))
    return commands


@dataclass
class Run:
    """Run as typed (placeholders filled), with ``shrink`` appended to its ``python -m`` part."""

    shrink: list[str] = field(default_factory=list)
    fill: dict[str, str] = field(default_factory=dict)  # README word -> key of a value made earlier


@dataclass
class Needs:
    """Cannot run here (``reason``): compose the exact overrides, run the first step with ``swap``."""

    reason: str
    swap: list[str] = field(default_factory=list)
    entry: str = "train"


INSTALLED_BY_CI = "the install .ci/run does in a fresh virtual environment (test_ci_runs_the_readme_commands)"

CASES: dict[str, Run | Needs | str] = {
    "pip install -e . && python -m dac_detr.train": Run(shrink=SHRINK_TRAIN),
    "pip install -e '.[dev]' && python -m pytest -q": "this test suite itself, run by .ci/run (test_ci_runs_the_readme_commands)",
    "python -m dac_detr.train experiment=r50_12ep paths.data_dir=/data": Needs("COCO 2017 under /data, R50 weights download, 8 GPUs"),
    "python -m dac_detr.train experiment=swin_l paths.data_dir=/data": Needs("COCO 2017 under /data, Swin-L weights download, 8 GPUs"),
    "python -m dac_detr.train experiment=r50_12ep trainer.devices=4 data.batch_size=4": Needs(
        "4 GPUs, COCO, R50 weights", swap=["trainer=cpu", "trainer.devices=1"]),
    "python -m dac_detr.train experiment=r50_12ep data=custom data.root=/data/my_set data.train_annotations=annotations/train.json "
    "data.train_images=images/train data.val_annotations=annotations/val.json data.val_images=images/val": Needs(
        "a data set of the user's under /data/my_set, R50 weights download, GPUs", swap=["custom_data"]),
    "python -m dac_detr.train experiment=r50_12ep data=custom data.root=/data/my_set init_from=converted_official_r50.pth": Needs(
        "a data set of the user's, an official checkpoint (downloaded, then scripts/convert_official.py)",
        swap=["custom_data", "r50_weights"]),
    "python -m dac_detr.data.synthetic my_set --classes 3 --train 200 --val 50 --image-size 64": Run(shrink=["--train", "16", "--val", "8"]),
    "python -m dac_detr.train data=custom data.root=my_set 'data.train_scales=[64]' data.train_max_size=107 data.val_size=64 "
    "data.val_max_size=107 init_from=PATH": Run(shrink=SHRINK_TRAIN[:4] + ["data.batch_size=2"], fill={"PATH": "quickstart_ckpt"}),
    "python -m dac_detr.train -m dac.o2m.topk=4,8": Run(shrink=SHRINK_TRAIN),
    "python -m dac_detr.train -m experiment=r50_12ep dac.o2m.threshold=0.3,0.4,0.5 dac.o2m.topk=4,6,8 backbone=r50,swin_l": Needs(
        "18 COCO jobs on GPUs, R50 and Swin-L weights"),
    "python -m dac_detr.train -m hparams_search=dac_o2m experiment=r50_12ep": Needs("COCO, GPUs, R50 weights"),
    "python -m dac_detr.train -m hydra/launcher=slurm experiment=r50_12ep hydra.launcher.partition=gpu": Needs(
        "a SLURM cluster, COCO, R50 weights"),
    "python -m dac_detr.evaluate ckpt=logs/r50_12ep/.../checkpoints/last.ckpt paths.data_dir=/data": Needs(
        "a trained R50 checkpoint and COCO", swap=["r50_checkpoint"], entry="evaluate"),
    "python -m dac_detr.evaluate ckpt=converted_official_r50.pth paths.data_dir=/data": Needs(
        "an official checkpoint (downloaded, then converted) and COCO", swap=["r50_weights"], entry="evaluate"),
    "python -m dac_detr.predict ckpt=PATH images=DIR out=DIR": Run(fill={"PATH": "quickstart_ckpt", "DIR": "val_images|predictions"}),
    "python -m dac_detr.export ckpt=PATH out=model.pth": Run(fill={"PATH": "quickstart_ckpt"}),
    "python -m dac_detr.export ckpt=PATH format=onnx out=model.onnx": Run(fill={"PATH": "quickstart_ckpt"}),
    "python -m dac_detr.export ckpt=PATH format=onnx postprocess=topk out=model_topk.onnx": Run(
        fill={"PATH": "quickstart_ckpt"}),
    "python -m dac_detr.predict ckpt=model.onnx images=DIR out=DIR": Run(fill={"DIR": "val_images|predictions_onnx"}),
}


def test_every_readme_command_has_a_case():
    commands = readme_commands()
    missing = [c for c in commands if c not in CASES]
    assert not missing, "README commands without a case in tests/test_readme.py (add one):\n" + "\n".join(missing)
    stale = [c for c in CASES if c not in commands]
    assert not stale, "cases for commands no longer in the README (remove them):\n" + "\n".join(stale)
    for case in CASES.values():
        if isinstance(case, Run):
            assert not [s for s in case.shrink if s.startswith(FORBIDDEN_PREFIXES)], "a shrink override moves or swaps things"


def test_ci_runs_the_readme_commands():
    """The README's first two lines are what .ci/run does (install, then the tests)."""
    ci = (REPO / ".ci" / "run").read_text()
    install, tests = readme_commands()[:2]
    assert install.startswith("pip install -e .") and tests.startswith("pip install -e '.[dev]' && python -m pytest -q")
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest -q" in ci


def _python_parts(command: str) -> list[list[str]]:
    """The ``python -m ...`` commands of a line (``pip install`` parts are the CI install, checked above)."""
    parts = [shlex.split(p) for p in command.split(" && ")]
    return [p for p in parts if p[0] == "python" and p[1:3] != ["-m", "pytest"]]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A user's shell: one working directory outside the checkout, shared by the commands in order."""
    workdir = tmp_path_factory.mktemp("user")
    assert REPO not in workdir.parents
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1", "DAC_DETR_DATA": str(tmp_path_factory.mktemp("data_cache"))}
    return {"workdir": workdir, "env": env, "made": {}, "outputs": {}}


def _fill(words: list[str], fill: dict[str, str], made: dict[str, str]) -> list[str]:
    """``key=PLACEHOLDER`` words filled; "a|b" fills the first occurrence with a, the second with b."""
    filled, seen = [], {p: 0 for p in fill}
    for word in words:
        for placeholder, keys in fill.items():
            if word.endswith("=" + placeholder):
                word = word[: -len(placeholder)] + made[keys.split("|")[seen[placeholder]]]
                seen[placeholder] += 1
        filled.append(word)
    return filled


def _run_as_typed(session, command: str) -> str:
    case = CASES[command]
    output = ""
    for words in _python_parts(command):
        words = _fill(words, case.fill, session["made"])
        argv = [sys.executable, *words[1:], *case.shrink]
        result = subprocess.run(argv, cwd=session["workdir"], env=session["env"], capture_output=True, text=True,
                                timeout=900)
        output += result.stdout + result.stderr
        assert result.returncode == 0, f"README command failed as typed: {shlex.join(words)}\n{output[-5000:]}"
    session["outputs"][command] = output
    return output


RUN_COMMANDS = [c for c, case in CASES.items() if isinstance(case, Run)]


def test_readme_commands_run_as_typed(session):
    """All as-typed commands, in README order, each checked for what it promises."""
    workdir, made = session["workdir"], session["made"]
    order = [c for c in readme_commands() if c in RUN_COMMANDS]
    quickstart, make_set, finetune, sweep, predict, export, export_onnx, export_topk, predict_onnx = order

    output = _run_as_typed(session, quickstart)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in output  # the COCO table
    (ckpt,) = workdir.glob("logs/quickstart/runs/*/checkpoints/last.ckpt")
    made["quickstart_ckpt"] = str(ckpt)
    assert f"Run folder: {ckpt.parents[1]}" in output  # printed at the start and the end
    assert output.count(f"Run folder: {ckpt.parents[1]}") >= 2

    _run_as_typed(session, make_set)
    categories = json.loads((workdir / "my_set" / "annotations" / "instances_train2017.json").read_text())["categories"]
    assert [c["name"] for c in categories] == ["square", "disc", "triangle"]

    _run_as_typed(session, finetune)
    (report_file,) = workdir.glob("logs/quickstart/runs/*/init_from.yaml")
    report = yaml.safe_load(report_file.read_text())
    skipped = next(v for k, v in report.items() if k.startswith("re-initialised, shape differs"))
    # 6 -> 3 classes: exactly the class-dependent tensors are re-initialised, everything else loads
    assert skipped and all("class_embed" in n or "label_enc" in n for n in skipped), skipped
    assert report["loaded"] and not next(v for k, v in report.items() if k.startswith("re-initialised, not in"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert len(report["loaded"]) == len([k for k in state if k.startswith("model.")]) - len(skipped)

    output = _run_as_typed(session, sweep)
    (sweep_dir,) = workdir.glob("logs/quickstart/multiruns/*")
    assert sorted(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0] for d in sweep_dir.iterdir()
                  if d.is_dir()) == ["dac.o2m.topk=4", "dac.o2m.topk=8"]
    table = output[output.index("job  val/mAP"):]  # the end-of-sweep table: overrides, val/mAP, folder
    assert "dac.o2m.topk=4" in table and "dac.o2m.topk=8" in table and str(sweep_dir / "0") in table

    made["val_images"] = str(next(Path(session["env"]["DAC_DETR_DATA"]).glob("synthetic-coco-*train16-val8*")) / "val2017")
    made["predictions"] = str(workdir / "predictions")
    _run_as_typed(session, predict)
    detections = json.loads((workdir / "predictions" / "detections.json").read_text())
    assert {d["file_name"] for d in detections} <= {p.name for p in Path(made["val_images"]).iterdir()}

    _run_as_typed(session, export)
    assert (workdir / "model.pth").is_file()

    _check_onnx_commands(session, export_onnx, export_topk, predict_onnx, detections)


def _check_onnx_commands(session, export_onnx: str, export_topk: str, predict_onnx: str, detections: list[dict]) -> None:
    """The deploy recipe: both exports load in onnxruntime with the promised contract, and predict
    with the ONNX file writes the PyTorch predict's detections."""
    import numpy as np
    import onnxruntime

    from dac_detr.data.synthetic import CLASSES as SYNTHETIC_CLASSES
    from dac_detr.deploy.graph import DETECTION_OUTPUTS, RAW_OUTPUTS
    from dac_detr.deploy.onnx_export import read_metadata

    workdir, made = session["workdir"], session["made"]
    _run_as_typed(session, export_onnx)
    _run_as_typed(session, export_topk)
    for name, outputs in (("model.onnx", RAW_OUTPUTS), ("model_topk.onnx", DETECTION_OUTPUTS + RAW_OUTPUTS)):
        ort = onnxruntime.InferenceSession(str(workdir / name), providers=["CPUExecutionProvider"])
        assert [o.name for o in ort.get_outputs()] == list(outputs), name
        assert read_metadata(workdir / name)["class_names"] == [cls for cls, _colour in SYNTHETIC_CLASSES]
        # dynamic batch and size: a padded batch of two at a size the export never saw
        feed = {"images": np.random.default_rng(0).normal(size=(2, 3, 72, 88)).astype(np.float32),
                "pixel_mask": np.zeros((2, 72, 88), dtype=bool)}
        if "scores" in outputs:
            feed["orig_sizes"] = np.array([[72, 88], [60, 80]], dtype=np.int64)
        result = dict(zip(outputs, ort.run(list(outputs), feed)))
        assert result["pred_boxes"].shape == (2, 30, 4)  # the quickstart's 30 queries
        if "scores" in result:
            assert result["scores"].shape[0] == result["labels"].shape[0] == result["boxes"].shape[0] == 2

    made["predictions_onnx"] = str(workdir / "predictions_onnx")
    _run_as_typed(session, predict_onnx)
    onnx_rows = json.loads((workdir / "predictions_onnx" / "detections.json").read_text())
    # the shrunk quickstart may find nothing above predict's score_threshold, so the rows may be none;
    # tests/test_export_onnx.py compares the two predicts on real detections at threshold 0
    assert len(onnx_rows) == len(detections)
    drawn = {p.name for p in Path(made["val_images"]).iterdir()}
    for folder in ("predictions", "predictions_onnx"):  # every image drawn, by both
        assert {p.name for p in (workdir / folder).iterdir() if p.suffix != ".json"} == drawn, folder
    unmatched = list(detections)
    for ours in onnx_rows:  # each ONNX detection pairs with one PyTorch detection of its image
        twin = next((theirs for theirs in unmatched if _same_detection(ours, theirs)), None)
        assert twin is not None, f"ONNX detection {ours} has no PyTorch twin"
        unmatched.remove(twin)


def _same_detection(a: dict, b: dict) -> bool:
    """Same image and category, score within 1e-4, box within 1e-2 px."""
    return ((a["file_name"], a["category_id"]) == (b["file_name"], b["category_id"])
            and abs(a["score"] - b["score"]) < 1e-4 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-2)


# ---- commands that need what CI cannot have: compose exactly, then the first step on synthetic data ----

NEEDS_COMMANDS = [c for c, case in CASES.items() if isinstance(case, Needs)]


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a basic-sweeper grid (comma lists expanded), or [overrides] for a single run."""
    choices = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] if "," in o and "=" in o else [o]
               for o in overrides]
    return [list(job) for job in itertools.product(*choices)]


def _r50_weights_file(directory: Path) -> Path:
    """A weights-only file of an R50 detector at the shrunk shape with 6 classes (stands in for a converted official file)."""
    path = directory / "r50_weights.pth"
    if not path.exists():
        from dac_detr.utils.instantiate import build_detector

        cfg = compose_train(["experiment=r50_12ep", "backbone.pretrained=null", *_coco_shrink("r50")], output_dir=directory)
        torch.save({"model": build_detector(cfg, 6).state_dict()}, path)  # the layout convert_official.py writes
    return path


def _coco_shrink(backbone: str) -> list[str]:
    return [o for o in SHRINK_COCO if backbone == "swin_l" or not o.startswith("backbone.depths")]


def _swapped(case: Needs, job: list[str], tmp_path: Path, session) -> list[str]:
    """``job`` with the case's swaps for what CI lacks, plus the synthetic data and the shrink."""
    backbone = "swin_l" if "experiment=swin_l" in job or "backbone=swin_l" in job else "r50"
    data = SYNTHETIC_128
    swaps = []
    for swap in case.swap:
        if swap == "custom_data":
            # the README's data.train_annotations=... etc. are kept: the set has their layout
            data = ["data.root=" + str(_custom_set(session)), "data.train_scales=[128]", "data.train_max_size=192",
                    "data.val_size=128", "data.val_max_size=192"]
        elif swap == "r50_weights":
            swaps.append(f"{'init_from' if case.entry == 'train' else 'ckpt'}={_r50_weights_file(tmp_path)}")
        elif swap == "r50_checkpoint":
            swaps.append(f"ckpt={_r50_checkpoint(tmp_path, session)}")
        else:
            swaps.append(swap)
    # The launcher (hydra.*) does not take part in one in-process step; data, weights and devices are swapped.
    kept = [o for o in job if not o.startswith(("data=", "data.root=", "init_from=", "ckpt=", "trainer.devices=", "hydra"))
            or (o.startswith("data=") and "custom_data" in case.swap)]
    shrink = _coco_shrink(backbone)
    if case.entry == "evaluate":
        shrink = [o if o != "trainer.limit_val_batches=0" else "trainer.limit_val_batches=2" for o in shrink]
    return [*kept, *data, *swaps, "backbone.pretrained=null", "logger=none", *shrink]


def _custom_set(session) -> Path:
    """A 3-class COCO-format set in COCO's layout and also in the README's (annotations/train.json, images/train)."""
    root = session["workdir"] / "needs_my_set"
    if not root.exists():
        from dac_detr.data.synthetic import generate_synthetic_coco

        generate_synthetic_coco(root, num_train=8, num_val=4, image_size=64, num_classes=3)
        import shutil

        for split in ("train", "val"):
            shutil.copy(root / "annotations" / f"instances_{split}2017.json", root / "annotations" / f"{split}.json")
            shutil.copytree(root / f"{split}2017", root / "images" / split)
    return root


def _r50_checkpoint(tmp_path: Path, session) -> Path:
    """A last.ckpt of the shrunk R50 recipe after one step (stands in for a trained R50)."""
    found = list(tmp_path.glob("r50_run/checkpoints/last.ckpt"))
    if not found:
        cfg = compose_train(["experiment=r50_12ep", *_swapped(Needs(""), [], tmp_path, session),
                             "trainer=cpu", "trainer.devices=1", "trainer.limit_val_batches=1", f"paths.log_dir={tmp_path}"],
                            output_dir=tmp_path / "r50_run")  # last.ckpt is written after validation
        train(cfg)
        found = list(tmp_path.glob("r50_run/checkpoints/last.ckpt"))
    return found[0]


@pytest.mark.parametrize("command", NEEDS_COMMANDS, ids=lambda c: c.split("python -m ")[-1][:60])
def test_readme_commands_that_need_coco_or_gpus_compose_and_step(command, session, tmp_path, monkeypatch):
    case = CASES[command]
    (words,) = _python_parts(command)
    entry = words[2].removeprefix("dac_detr.")
    overrides = [w for w in words[3:] if w != "-m"]
    config_name = {"train": "train", "evaluate": "eval"}[entry]
    monkeypatch.chdir(session["workdir"])

    # 1. the command's own overrides compose, every job of a sweep
    jobs = _sweep_jobs(overrides) if "-m" in words else [overrides]
    for job in jobs:
        compose_train(job, output_dir=tmp_path / "compose", config_name=config_name)
    if "-m" in words and "hparams_search=dac_o2m" not in overrides:
        assert len(jobs) == max(1, len(list(itertools.product(*[o.split("=", 1)[1].split(",") for o in overrides if "," in o]))))

    # 2. the first step on synthetic data: one job per backbone of a sweep
    firsts = {("swin_l" if "backbone=swin_l" in job or "experiment=swin_l" in job else "r50"): job for job in jobs}
    for job in firsts.values():
        run_overrides = [*_swapped(case, job, tmp_path, session), "trainer=cpu", "trainer.devices=1"]
        if entry == "train":
            cfg = compose_train([*run_overrides, f"paths.log_dir={tmp_path}"], output_dir=tmp_path / "run")
            metrics = train(cfg)
            assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        else:
            from dac_detr.evaluate import evaluate

            cfg = compose_train([*run_overrides, f"paths.log_dir={tmp_path}"], output_dir=tmp_path / "eval", config_name="eval")
            metrics = evaluate(cfg)
            assert 0.0 <= metrics["mAP"] <= 1.0
