"""CocoEvaluator against COCOeval run directly, both backends, DDP gathering, QueriesPerObject."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket

import numpy as np
import pytest
import torch

from dac_detr.evaluation import CocoEvaluator, QueriesPerObject, format_coco_table

BACKENDS = ["pycocotools", "faster_coco_eval"]
CATEGORY_IDS = [3, 7, 20]  # non-contiguous on purpose: labels 0..2 map to these


def make_gt(num_images: int = 12, seed: int = 0) -> dict:
    """Random GT boxes of all three COCO area ranges on 200x160 images (plus one empty image)."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 160})
        if i == num_images:
            continue  # an image without objects
        for _ in range(rng.integers(1, 5)):
            side = float(rng.choice([12, 24, 50, 80, 110]))
            w, h = side, side * rng.uniform(0.6, 1.0)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 160 - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice(CATEGORY_IDS)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    anns[0]["iscrowd"] = 1  # a crowd region: COCOeval ignores detections on it
    cats = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_from(data: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def label_of(category_id: int) -> int:
    return CATEGORY_IDS.index(category_id)


def detections_from_gt(data: dict, shift: float = 0.0, drop_every: int = 0, seed: int = 1):
    """Per-image PostProcess-style dicts built from the GT: optionally shifted, some dropped, plus a false positive."""
    rng = np.random.default_rng(seed)
    per_image = {img["id"]: ([], [], []) for img in data["images"]}
    for k, a in enumerate(data["annotations"]):
        if drop_every and k % drop_every == 0:
            continue
        x, y, w, h = a["bbox"]
        dx = shift * w * rng.uniform(-1, 1)
        boxes, scores, labels = per_image[a["image_id"]]
        boxes.append([x + dx, y, x + dx + w, y + h])
        scores.append(float(rng.uniform(0.3, 1.0)))
        labels.append(label_of(a["category_id"]))
    per_image[1][0].append([0, 0, 30, 30])  # a false positive
    per_image[1][1].append(0.95)
    per_image[1][2].append(0)
    out = {}
    for image_id, (boxes, scores, labels) in per_image.items():
        out[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    return out


def direct_cocoeval(data: dict, results_path) -> np.ndarray:
    """COCOeval exactly as its README runs it, on a results file."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_from(data)
        dt = gt.loadRes(str(results_path))
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def run_evaluator(data, detections, backend, batch=5):
    evaluator = CocoEvaluator(coco_from(data), lambda label: CATEGORY_IDS[label], backend=backend)
    ids = sorted(detections)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        evaluator.update(torch.tensor(chunk), [detections[i] for i in chunk])
    return evaluator


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(backend):
    data = make_gt()
    data["annotations"][0]["iscrowd"] = 0
    detections = detections_from_gt(data)
    detections[1] = {k: v[:-1] for k, v in detections[1].items()}  # remove the false positive
    metrics = run_evaluator(data, detections, backend).compute()
    for key in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_10", "AR_100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["per_class"] == {f"class{c}": pytest.approx(1.0) for c in CATEGORY_IDS}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift,drop_every", [(0.15, 0), (0.0, 3), (0.3, 4)])
def test_shifted_or_missing_predictions_match_cocoeval(tmp_path, backend, shift, drop_every):
    data = make_gt(seed=2)
    detections = detections_from_gt(data, shift=shift, drop_every=drop_every)
    evaluator = run_evaluator(data, detections, backend)
    metrics = evaluator.compute()
    path = evaluator.write_results(tmp_path / "results.json")
    results = json.loads(path.read_text())
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)  # labels mapped back to category ids
    reference = direct_cocoeval(data, path)
    names = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100"]
    for name, expected in zip(names, reference.stats[:9]):
        assert metrics[name] == pytest.approx(expected, abs=1e-12), name
    assert 0 < metrics["mAP"] < 1
    precision = reference.eval["precision"]
    for k, cat in enumerate(CATEGORY_IDS):
        p = precision[:, :, k, 0, -1]
        assert metrics["per_class"][f"class{cat}"] == pytest.approx(p[p > -1].mean(), abs=1e-12)
    assert "Average Precision" in evaluator.summary


def test_results_json_round_trips_boxes(tmp_path):
    data = make_gt(num_images=3)
    detections = detections_from_gt(data)
    evaluator = run_evaluator(data, detections, "pycocotools")
    results = json.loads(evaluator.write_results(tmp_path / "sub" / "r.json").read_text())
    first = [r for r in results if r["image_id"] == 2][0]
    box = detections[2]["boxes"][0].tolist()
    assert first["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]], abs=1e-4)
    assert first["category_id"] == CATEGORY_IDS[int(detections[2]["labels"][0])]


def test_no_detections_and_undefined_ranges():
    data = make_gt(num_images=4)
    empty = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)} for i in range(1, 5)}
    metrics = run_evaluator(data, empty, "pycocotools").compute()
    assert metrics["mAP"] == 0.0 and metrics["AR_100"] == 0.0
    # Only small objects: the medium/large APs have no ground truth and are NaN, not -1.
    data = make_gt(num_images=4)
    for a in data["annotations"]:
        a["bbox"][2:] = [10, 10]
        a["area"] = 100
    metrics = run_evaluator(data, detections_from_gt(data), "pycocotools").compute()
    assert math.isnan(metrics["mAP_l"]) and math.isnan(metrics["mAP_m"]) and metrics["mAP_s"] > 0
    table = format_coco_table(metrics)  # without COCOeval's summary: the same rows from the metrics
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in table
    assert "area= large | maxDets=100 ] =   n/a" in table and "class3" in table


def test_bad_update_calls_and_reset():
    data = make_gt(num_images=2)
    evaluator = CocoEvaluator(coco_from(data), {0: 3, 1: 7, 2: 20})
    det = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    with pytest.raises(ValueError, match="Image id 99 is not in the ground-truth"):
        evaluator.update([99], [det])
    with pytest.raises(ValueError, match="2 image ids but 1"):
        evaluator.update([1, 2], [det])
    with pytest.raises(ValueError, match="before any update"):
        evaluator.compute()
    evaluator.update([1], [det])
    evaluator.reset()
    with pytest.raises(ValueError, match="before any update"):
        evaluator.compute()
    with pytest.raises(ValueError, match="backend must be one of"):
        CocoEvaluator(coco_from(data), [3, 7, 20], backend="torchmetrics")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: dict, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        detections = detections_from_gt(data, shift=0.2)
        ids = sorted(detections)
        # DistributedSampler style: interleaved, and the last image repeated to even out the ranks.
        mine = ids[rank::world] + ([ids[0]] if rank == world - 1 and len(ids) % world else [])
        evaluator = CocoEvaluator(coco_from(data), lambda label: CATEGORY_IDS[label])
        for i in mine:
            evaluator.update([i], [detections[i]])
        metrics = evaluator.compute()
        written = evaluator.write_results(os.path.join(out_dir, "results.json"))
        # A failure on rank 0 (here: nothing to evaluate) reaches every rank instead of hanging them.
        evaluator.reset()
        try:
            evaluator.compute()
            raised = ""
        except ValueError as e:
            raised = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "wrote": written is not None, "raised": raised}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_gathers_once_and_every_rank_gets_the_same_metrics(tmp_path):
    data = make_gt(num_images=11, seed=5)
    # fork: the workers inherit the imported modules instead of re-importing torch (seconds each).
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, _free_port(), data, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    single_evaluator = run_evaluator(data, detections_from_gt(data, shift=0.2), "pycocotools")
    single = single_evaluator.compute()
    single_results = json.loads(single_evaluator.write_results(tmp_path / "single.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["metrics"]["mAP"] == pytest.approx(single["mAP"], abs=1e-12)
        assert r["metrics"]["per_class"] == pytest.approx(single["per_class"], abs=1e-12)
    assert [r["wrote"] for r in ranks] == [True, False]  # only rank 0 writes the results file
    assert all("before any update" in r["raised"] for r in ranks)
    # Every image once, although rank 1 saw image 1 a second time.
    gathered = json.loads((tmp_path / "results.json").read_text())
    key = lambda r: (r["image_id"], r["score"])  # noqa: E731
    assert sorted(gathered, key=key) == sorted(single_results, key=key)


# ------------------------------------------------------------------------------- QueriesPerObject
def test_queries_per_object_counts_pairs_above_each_threshold():
    # One image, two objects (labels 0 and 1), four queries.
    gt = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    pred_boxes = torch.tensor([[[0.25, 0.25, 0.2, 0.2],   # exact on object 0: IoU 1
                                [0.25, 0.25, 0.2, 0.1],   # half of object 0: IoU 0.5
                                [0.7, 0.7, 0.2, 0.2],     # exact on object 1
                                [0.9, 0.1, 0.05, 0.05]]])  # nowhere
    probs = torch.tensor([[[0.9, 0.0], [1.0, 0.0], [0.0, 0.2], [1.0, 1.0]]])
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    metric = QueriesPerObject(thresholds=(0.6, 0.7, 0.8), score_weights=(0.3, 0.7))
    metric.update(logits, pred_boxes, [{"labels": torch.tensor([0, 1]), "boxes": gt}])
    # Scores: object 0 -> q0 0.97, q1 0.65, q3 0.3; object 1 -> q2 0.76, q3 0.3.
    assert metric.compute() == pytest.approx({0.6: 3 / 2, 0.7: 2 / 2, 0.8: 1 / 2})
    # An image without objects changes nothing; a second image adds its objects.
    metric.update(logits, pred_boxes, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    metric.update(logits, pred_boxes, [{"labels": torch.tensor([0]), "boxes": gt[:1]}])
    assert metric.compute() == pytest.approx({0.6: 5 / 3, 0.7: 3 / 3, 0.8: 2 / 3})
    metric.reset()
    assert int(metric.num_objects) == 0 and int(metric.pair_counts.sum()) == 0
