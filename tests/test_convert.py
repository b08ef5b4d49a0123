"""Official-checkpoint import: names and shapes from the official state-dict listings, strict load, exact round trip."""

from __future__ import annotations

import argparse
import math
import os
import runpy
from pathlib import Path

import pytest
import torch

from dac_detr.models import DACDETR
from dac_detr.models.backbone import ResNetBackbone, SwinBackbone
from dac_detr.models.convert import (
    NotAnOfficialCheckpointError,
    load_official,
    official_to_ours,
    ours_to_official,
    read_official_checkpoint,
)
from dac_detr.models.swin import relative_position_index

# The official name/shape lists (tests/data/reference) are kept with the tests;
# DAC_DETR_REFERENCE_DIR points elsewhere.
REFERENCE = Path(os.environ.get("DAC_DETR_REFERENCE_DIR", Path(__file__).parent / "data" / "reference"))
REPO = Path(__file__).resolve().parents[1]


def convert_cli(*args: str) -> int:
    """scripts/convert_official.py's main(), run in this process (no second interpreter start-up)."""
    return runpy.run_path(str(REPO / "scripts" / "convert_official.py"), run_name="convert_official")["main"](list(args))


def reference_entries(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if not (REFERENCE / name).is_file():
        raise FileNotFoundError(f"{REFERENCE / name} is missing: set DAC_DETR_REFERENCE_DIR to the folder holding "
                                "official_r50_state_dict.txt and official_swin_l_state_dict.txt")
    entries = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        entries[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), getattr(torch, dtype))
    return entries


def random_official_state_dict(entries, seed=0) -> dict[str, torch.Tensor]:
    """Random values with the official names, shapes and dtypes; head aliases share tensors as officially."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in entries.items():
        if key.startswith("transformer.decoder.class_embed.") or key.startswith("transformer.decoder.bbox_embed."):
            continue
        if key.endswith("relative_position_index"):  # a fixed buffer the Swin mapping verifies
            window = math.isqrt(shape[0])
            sd[key] = relative_position_index(window, window)
        else:
            sd[key] = torch.randn(shape, generator=g, dtype=dtype)
    for key in entries:
        for alias, primary in (("transformer.decoder.class_embed.", "class_embed."),
                               ("transformer.decoder.bbox_embed.", "bbox_embed.")):
            if key.startswith(alias):
                sd[key] = sd[primary + key[len(alias):]]
    return sd


@pytest.fixture(scope="module")
def r50_model():
    return DACDETR(ResNetBackbone(name="resnet50", pretrained=None), num_classes=91)


def test_r50_parameter_count_equals_official(r50_model):
    # tests/data/reference/official_r50_state_dict.txt header: 47,739,225 total, 47,516,825 trainable
    assert sum(p.numel() for p in r50_model.parameters()) == 47_739_225
    assert sum(p.numel() for p in r50_model.parameters() if p.requires_grad) == 47_516_825


def test_r50_reference_state_dict_loads_strictly_and_round_trips(r50_model, tmp_path):
    entries = reference_entries("official_r50_state_dict.txt")
    assert len(entries) == 632
    official = random_official_state_dict(entries)
    ours = official_to_ours(official)
    assert len(ours) == 632 - 56  # 7 class heads x 2 + 7 box heads x 6 tensors held twice officially
    load_official(r50_model, official)  # strict
    loaded = r50_model.state_dict()
    assert set(loaded) == set(ours)
    for key, value in ours.items():
        assert torch.equal(loaded[key], value), key
    # the heads land where the official decoder aliases pointed
    assert torch.equal(loaded["bbox_embed.6.layers.2.weight"], official["transformer.decoder.bbox_embed.6.layers.2.weight"])

    back = ours_to_official(r50_model.state_dict())
    assert list(back) and set(back) == set(official)
    for key, value in official.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key

    # through a file in the official layout, with the pickled argparse.Namespace main.py stores
    src, dst = tmp_path / "checkpoint0011.pth", tmp_path / "converted.pth"
    torch.save({"model": official, "args": argparse.Namespace(lr=2e-4, backbone="resnet50"), "epoch": 11}, src)
    assert set(read_official_checkpoint(src)) == set(official)
    assert convert_cli(str(src), str(dst)) == 0
    converted = torch.load(dst, weights_only=True)["model"]
    r50_model.load_state_dict(converted, strict=True)
    assert torch.equal(r50_model.state_dict()["transformer.level_embed"], official["transformer.level_embed"])


def test_wrong_files_give_a_clear_error(r50_model, tmp_path, caplog):
    ours = tmp_path / "ours.pth"
    torch.save({"model": r50_model.state_dict()}, ours)
    with pytest.raises(NotAnOfficialCheckpointError, match="not an official DAC-DETR checkpoint"):
        read_official_checkpoint(ours)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(NotAnOfficialCheckpointError, match="garbage.pth"):
        read_official_checkpoint(garbage)
    with pytest.raises(NotAnOfficialCheckpointError, match="missing.pth does not exist"):
        read_official_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(NotAnOfficialCheckpointError, match="not an official DAC-DETR state dict"):
        official_to_ours({"weight": torch.zeros(1)})
    with pytest.raises(SystemExit) as exit_info:  # the entry points' error boundary: one line, exit code 1
        convert_cli(str(ours), str(tmp_path / "out.pth"))
    assert exit_info.value.code == 1
    assert "not an official DAC-DETR checkpoint" in caplog.text
    assert not (tmp_path / "out.pth").exists()


def test_edited_aliases_and_wrong_model_are_refused(r50_model):
    official = random_official_state_dict(reference_entries("official_r50_state_dict.txt"))
    official["transformer.decoder.class_embed.3.bias"] = official["class_embed.3.bias"] + 1
    with pytest.raises(NotAnOfficialCheckpointError, match="differs from 'class_embed.3.bias'"):
        official_to_ours(official)
    official = random_official_state_dict(reference_entries("official_r50_state_dict.txt"))
    with torch.device("meta"):  # only the shapes matter here
        small = DACDETR(ResNetBackbone(name="resnet50", pretrained=None), num_classes=80)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_official(small, official)


def test_swin_l_reference_state_dict_loads_strictly_and_round_trips():
    # built on the meta device: Swin-L's random init alone takes ~25 s on 2 cores
    with torch.device("meta"):
        model = DACDETR(SwinBackbone(pretrained=None), num_classes=91)
    # tests/data/reference/official_swin_l_state_dict.txt header: 218,076,109 parameters, all trainable
    assert sum(p.numel() for p in model.parameters()) == 218_076_109
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 218_076_109
    entries = reference_entries("official_swin_l_state_dict.txt")
    assert len(entries) == 722
    official = random_official_state_dict(entries)
    ours = official_to_ours(official)
    load_official(model, official, assign=True)
    loaded = model.state_dict()
    assert set(loaded) == set(ours)
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())
    assert all(p.requires_grad for p in model.parameters())
    back = ours_to_official(loaded)
    assert set(back) == set(official)
    for key, value in official.items():
        assert torch.equal(back[key], value), key
