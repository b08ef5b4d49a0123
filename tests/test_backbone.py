"""ResNet backbone: output contract, frozen parts, official state-dict names, pretrained loading."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.ops import FrozenBatchNorm2d

from dac_detr.models.backbone import PretrainedWeightsUnavailable, ResNetBackbone

REPO = Path(__file__).resolve().parents[1]
# The official checkpoints' state-dict listings (every name with its shape), kept with the tests.
REFERENCE = Path(__file__).parent / "data" / "reference"


def official_entries(file_name: str, prefix: str = "backbone.0.body.") -> list[tuple[str, tuple[int, ...]]]:
    """(name without prefix, shape) of every backbone entry of an official state-dict listing."""
    path = REFERENCE / file_name
    assert path.is_file(), f"reference listing {path} is missing (the official state-dict listings belong in tests/data/reference)"
    entries = []
    for line in path.read_text().splitlines():
        if line.startswith(prefix):
            name, shape, _dtype = line.split("\t")
            entries.append((name[len(prefix):], tuple(int(s) for s in shape.strip("[]").split(", ") if s)))
    return entries


def padded_batch(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of the given (h, w), zero-padded bottom-right; mask True on padding."""
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        mask[i, :h, :w] = False
    return images, mask


@pytest.fixture(scope="module")
def resnet18() -> ResNetBackbone:
    torch.manual_seed(0)
    return ResNetBackbone("resnet18")


@pytest.mark.parametrize(("name", "channels"), [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048])])
def test_output_shapes_strides_and_masks_on_a_padded_batch_of_odd_sizes(name, channels):
    backbone = ResNetBackbone(name)
    assert backbone.num_channels == channels
    assert backbone.strides == [8, 16, 32]
    images, mask = padded_batch([(97, 131), (61, 70)])
    outputs = backbone(images, mask)
    assert len(outputs) == 3
    for (feature, level_mask), c, stride in zip(outputs, channels, backbone.strides):
        expected_hw = (-(-97 // stride), -(-131 // stride))  # every stride-2 step rounds up
        assert feature.shape == (2, c, *expected_hw)
        assert level_mask.shape == (2, *expected_hw) and level_mask.dtype == torch.bool
        assert torch.equal(level_mask, F.interpolate(mask[None].float(), size=expected_hw)[0].bool())
        assert not level_mask[0].any()  # the largest image has no padding
        assert level_mask[1, -1, -1] and not level_mask[1, 0, 0]


def test_masks_follow_the_padding_per_image(resnet18):
    images, mask = padded_batch([(64, 96), (40, 48)])
    (_, mask8), (_, mask16), (_, mask32) = resnet18(images, mask)
    assert not mask8[0].any() and not mask32[0].any()
    # Image 1 covers 40x48 pixels: 5x6 cells at stride 8, 3x3 (rounded up) at stride 16.
    assert mask8[1, :5, :6].logical_not().all() and mask8[1, 5:].all() and mask8[1, :, 6:].all()
    assert mask16[1, :3, :3].logical_not().all() and mask16[1, :, 3:].all()


def test_stem_and_layer1_are_frozen_and_batchnorm_has_no_parameters():
    backbone = ResNetBackbone("resnet50")
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms == []  # no trainable BatchNorm anywhere
    frozen_bns = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen_bns) == 53 and all(m.eps == 1e-5 for m in frozen_bns)
    for name, param in backbone.body.named_parameters():
        trains = name.split(".")[0] in ("layer2", "layer3", "layer4")
        assert param.requires_grad == trains, name
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == 23_232_512  # docs/method.md, Parameter inventory: R50 layers 2-4

    images, mask = padded_batch([(64, 64)])
    before = {k: v.clone() for k, v in backbone.body.state_dict().items() if "bn" in k or "downsample.1" in k}
    sum(feature.sum() for feature, _ in backbone(images, mask)).backward()
    assert backbone.body.conv1.weight.grad is None and backbone.body.layer1[0].conv1.weight.grad is None
    assert backbone.body.layer2[0].conv1.weight.grad is not None
    backbone.train()
    backbone(images, mask)  # a training-mode pass must not update any BatchNorm statistics
    after = backbone.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_layers_option_and_bad_arguments():
    everything = ResNetBackbone("resnet18", train_layers=["layer1", "layer2", "layer3", "layer4"])
    assert everything.body.layer1[0].conv1.weight.requires_grad
    assert not everything.body.conv1.weight.requires_grad  # the stem is never a "layer"
    with pytest.raises(ValueError, match="not ResNet stages"):
        ResNetBackbone("resnet18", train_layers=["layer5"])
    with pytest.raises(ValueError, match="unknown ResNet 'resnet7'"):
        ResNetBackbone("resnet7")


def test_bad_inputs_give_clear_errors(resnet18):
    images, mask = padded_batch([(32, 32)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        resnet18(images[:, :1], mask)
    with pytest.raises(ValueError, match="does not match images"):
        resnet18(images, mask[:, :16])
    with pytest.raises(ValueError, match="must be bool"):
        resnet18(images, mask.float())
    with pytest.raises(ValueError, match="float images"):
        resnet18(images.to(torch.uint8), mask)


def test_r50_body_state_dict_equals_the_official_backbone_entries():
    official = official_entries("official_r50_state_dict.txt")
    ours = [(name, tuple(t.shape)) for name, t in ResNetBackbone("resnet50").body.state_dict().items()]
    assert ours == official
    assert len(ours) == 265


def test_local_pretrained_file_round_trip_with_wrappers_and_ignored_keys(tmp_path, resnet18, caplog):
    state = resnet18.body.state_dict()
    checkpoint = dict(state)
    checkpoint["fc.weight"] = torch.zeros(1000, 512)  # ImageNet head: expected, ignored
    checkpoint["bn1.num_batches_tracked"] = torch.tensor(0)  # newer BN checkpoints carry it
    path = tmp_path / "resnet18.pth"
    torch.save({"model": checkpoint}, path)

    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING):
        loaded = ResNetBackbone("resnet18", pretrained=str(path))
    assert not caplog.records  # nothing missing, nothing unexpected
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    assert set(loaded.load_report.ignored) == {"fc.weight", "bn1.num_batches_tracked"}
    for name, tensor in loaded.body.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not loaded.body.conv1.weight.requires_grad  # freezing still applies after loading

    # A torchvision-style file under 'state_dict', with one key missing and one unknown.
    partial = {k: v for k, v in state.items() if k != "layer4.1.conv2.weight"}
    partial["layer9.weight"] = torch.zeros(3)
    torch.save({"state_dict": partial}, path)
    with caplog.at_level(logging.WARNING):
        report = ResNetBackbone("resnet18", pretrained=path).load_report
    assert report.missing == ["layer4.1.conv2.weight"] and report.unexpected == ["layer9.weight"]
    text = caplog.text
    assert "MISSING" in text and "layer4.1.conv2.weight" in text
    assert "UNEXPECTED" in text and "layer9.weight" in text


def test_backbone_part_of_a_detector_checkpoint_is_accepted(tmp_path, resnet18):
    detector_state = {f"backbone.0.body.{k}": v for k, v in resnet18.body.state_dict().items()}
    detector_state["transformer.level_embed"] = torch.zeros(4, 256)
    path = tmp_path / "detector.pth"
    torch.save({"model": detector_state}, path)
    report = ResNetBackbone("resnet18", pretrained=path).load_report
    assert report.missing == [] and report.unexpected == []


def test_shape_mismatch_and_unreadable_files_are_errors(tmp_path, resnet18):
    path = tmp_path / "r50.pth"
    torch.save(ResNetBackbone("resnet50").body.state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*layer1.0.conv1.weight: checkpoint \(64, 64, 1, 1\)"):
        ResNetBackbone("resnet18", pretrained=path)
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    with pytest.raises(PretrainedWeightsUnavailable, match="could not read"):
        ResNetBackbone("resnet18", pretrained=text_file)


def test_missing_local_file_names_the_path_and_the_config_key(tmp_path):
    missing = tmp_path / "initmodel" / "resnet50-19c8e357.pth"
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        ResNetBackbone("resnet50", pretrained=str(missing))
    assert str(missing) in str(error.value) and "backbone.pretrained=" in str(error.value)


def test_torchvision_weights_offline_name_the_file_to_download(tmp_path, monkeypatch):
    # An empty hub cache and an unreachable proxy: a real download attempt that fails fast.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        ResNetBackbone("resnet50", pretrained="torchvision")
    message = str(error.value)
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "backbone.pretrained=" in message and "resnet50-19c8e357.pth" in message


def test_torchvision_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch, resnet18):
    """With the file in torch.hub's cache, "torchvision" loads it without any network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = dict(resnet18.body.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, cache / "resnet18-f37072fd.pth")
    loaded = ResNetBackbone("resnet18", pretrained="torchvision")
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    assert torch.equal(loaded.body.layer3[0].conv1.weight, resnet18.body.layer3[0].conv1.weight)


@pytest.mark.parametrize("config", ["r18", "r50"])
def test_hydra_configs_instantiate(config, monkeypatch):
    cfg = OmegaConf.load(REPO / "conf" / "backbone" / f"{config}.yaml")
    cfg.pretrained = None  # no network in tests; pretrained loading is covered above
    backbone = instantiate(cfg)
    assert isinstance(backbone, ResNetBackbone)
    assert backbone.name == f"resnet{config[1:]}"
    assert not backbone.body.layer1[0].conv1.weight.requires_grad
    assert backbone.body.layer2[0].conv1.weight.requires_grad
