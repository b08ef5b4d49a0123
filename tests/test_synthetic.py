"""The synthetic shapes set: determinism, pycocotools loading, content, caching, the data module."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dac_detr.data import synthetic
from dac_detr.data.synthetic import CLASSES, ensure_synthetic_coco, generate_synthetic_coco, main, size_ranges


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("syn") / "set", num_train=60, num_val=10, image_size=128, seed=3)


def test_deterministic_for_a_seed(tmp_path, synthetic_set):
    again = generate_synthetic_coco(tmp_path / "again", num_train=60, num_val=10, image_size=128, seed=3)
    assert digest(again) == digest(synthetic_set)
    other = generate_synthetic_coco(tmp_path / "other", num_train=60, num_val=10, image_size=128, seed=4)
    assert digest(other) != digest(synthetic_set)
    # Image i depends only on (seed, split, i): a longer set starts with the same images.
    longer = generate_synthetic_coco(tmp_path / "longer", num_train=61, num_val=10, image_size=128, seed=3)
    assert (longer / "train2017" / "000000000007.jpg").read_bytes() == (synthetic_set / "train2017" / "000000000007.jpg").read_bytes()


def test_pycocotools_loads_it_and_the_content_is_varied(synthetic_set):
    from pycocotools.coco import COCO

    for split, n in (("train", 60), ("val", 10)):
        coco = COCO(str(synthetic_set / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [name for name, _ in CLASSES]
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(synthetic_set / f"{split}2017" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (128, 128)
    coco = COCO(str(synthetic_set / "annotations" / "instances_train2017.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    areas = np.array([a["area"] for a in anns])
    # COCO's small / medium / large ranges are all present at 128 px.
    assert (areas < 32**2).sum() > 10 and ((areas >= 32**2) & (areas < 96**2)).sum() > 10 and (areas >= 96**2).sum() >= 1
    assert len({a["category_id"] for a in anns}) == 6
    assert max(per_image) >= 3 and min(per_image) == 0  # several objects per image, and empty images
    assert all(a["iscrowd"] == 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in anns)


def boxes_overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_boxes_are_tight_around_the_class_colour_and_objects_overlap(synthetic_set):
    data = json.loads((synthetic_set / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    overlaps = 0
    for img in data["images"]:
        pixels = np.asarray(Image.open(synthetic_set / "train2017" / img["file_name"]).convert("RGB")).astype(int)
        anns = by_image.get(img["id"], [])
        overlaps += sum(boxes_overlap(a["bbox"], b["bbox"]) for i, a in enumerate(anns) for b in anns[i + 1 :])
        for a in anns:
            x, y, w, h = (int(v) for v in a["bbox"])
            colour = np.array(CLASSES[a["category_id"] - 1][1])
            inside = np.abs(pixels[y : y + h, x : x + w] - colour).max(-1) < 60  # jitter 20 + noise + JPEG
            ys, xs = np.nonzero(inside)
            assert len(xs) > 0.3 * w * h or min(w, h) < 12  # thin rings / crosses cover less of their box
            # The class colour reaches the box edges (within a pixel of JPEG blur).
            assert xs.min() <= 1 and ys.min() <= 1 and xs.max() >= w - 2 and ys.max() >= h - 2
    assert overlaps > 5  # objects overlap and occlude each other


def test_size_ranges_follow_coco_thresholds():
    r = size_ranges(128)
    assert r["small"][1] ** 2 < 32**2 <= r["medium"][0] ** 2 and r["medium"][1] ** 2 < 96**2 < r["large"][0] ** 2
    assert "large" not in size_ranges(64)  # no room for > 96 px objects


def test_cache_is_generated_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DAC_DETR_DATA", str(tmp_path / "cache"))
    first = ensure_synthetic_coco(num_train=4, num_val=2, image_size=64, seed=1)
    assert first.parent == tmp_path / "cache" and (first / "annotations" / "instances_val2017.json").is_file()
    marker = first / "annotations" / "instances_train2017.json"
    stamp = marker.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(synthetic, "write_split", lambda *a, **k: calls.append(a))
    assert ensure_synthetic_coco(num_train=4, num_val=2, image_size=64, seed=1) == first
    assert calls == [] and marker.stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_interrupted_generation_is_never_reused(tmp_path, monkeypatch):
    real_write_split = synthetic.write_split

    def write_then_crash(out_dir, split, *args):
        real_write_split(out_dir, split, *args)
        if split == "train":
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way

    monkeypatch.setattr(synthetic, "write_split", write_then_crash)
    target = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_coco(target, num_train=3, num_val=2, image_size=64, seed=0)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "write_split", real_write_split)
    assert (ensure_synthetic_coco(target, num_train=3, num_val=2, image_size=64, seed=0) / "val2017").is_dir()


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--train", "3", "--val", "2", "--image-size", "64", "--seed", "5"]) == 0
    assert len(list((tmp_path / "cli" / "train2017").glob("*.jpg"))) == 3
    assert len(json.loads((tmp_path / "cli" / "annotations" / "instances_val2017.json").read_text())["images"]) == 2
    assert main([str(tmp_path / "cli"), "--train", "3", "--val", "2"]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "tiny"), "--image-size", "8"]) == 2


def test_small_fraction_makes_a_harder_set(tmp_path):
    """small_fraction raises the share of COCO-small objects; the default mix is unchanged."""

    def small_share(**kwargs) -> float:
        out = generate_synthetic_coco(tmp_path / str(len(list(tmp_path.iterdir()))), num_train=1, num_val=120, image_size=64, seed=0,
                                      max_objects=8, **kwargs)
        areas = [a["area"] for a in json.loads((out / "annotations" / "instances_val2017.json").read_text())["annotations"]]
        return sum(a < 32 * 32 for a in areas) / len(areas)

    default, harder = small_share(), small_share(small_fraction=0.9)
    assert harder > default + 0.2, (default, harder)
    assert synthetic.size_mix(size_ranges(128), None).tolist() == pytest.approx([0.25, 0.6, 0.15])
    assert synthetic.size_mix(size_ranges(128), 0.5).tolist() == pytest.approx([0.5, 0.5 * 0.6 / 0.75, 0.5 * 0.15 / 0.75])
    assert synthetic.synthetic_folder_name(10, 5, 64, 0, 8) == "synthetic-coco-v3-s64-train10-val5-obj8-seed0"
    assert synthetic.synthetic_folder_name(10, 5, 64, 0, 8, 0.6).endswith("-seed0-small0.6")
    with pytest.raises(ValueError, match="small_fraction"):
        generate_synthetic_coco(tmp_path / "bad", num_train=1, num_val=1, image_size=64, small_fraction=1.5)
