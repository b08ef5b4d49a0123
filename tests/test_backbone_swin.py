"""Swin backbone: any input size, the official forward semantics, name mapping, loading, Swin-L size."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.models.swin_transformer import PatchMerging

from dac_detr.models.backbone import (
    PretrainedWeightsUnavailable,
    SwinBackbone,
    swin_official_to_timm,
    swin_timm_to_official,
)
from dac_detr.models.swin import relative_position_index

REPO = Path(__file__).resolve().parents[1]
# The official checkpoints' state-dict listings (every name with its shape), kept with the tests.
REFERENCE = Path(__file__).parent / "data" / "reference"
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7, pretrain_img_size=224)


def tiny_swin(**overrides) -> SwinBackbone:
    return SwinBackbone("swin_tiny_patch4_window7_224", **{**TINY, "drop_path_rate": 0.0, **overrides})


def official_backbone_entries(file_name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    path = REFERENCE / file_name
    assert path.is_file(), f"reference listing {path} is missing (the official state-dict listings belong in tests/data/reference)"
    prefix = "backbone.0.body."
    entries = {}
    for line in path.read_text().splitlines():
        if line.startswith(prefix):
            name, shape, dtype = line.split("\t")
            entries[name[len(prefix):]] = (tuple(int(s) for s in shape.strip("[]").split(", ") if s), dtype)
    return entries


# ----------------------------------------------------------------- an independent reference forward


def reference_official_swin(sd: dict[str, torch.Tensor], images: torch.Tensor, depths, num_heads, window: int):
    """The official detection Swin, written out plainly on an official-named state dict.

    Pads to whole patches, pads each block's normed input to whole windows *then* shifts,
    concatenates the 2x2 neighbours as x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2],
    and applies norm{i} to the outputs of stages 1-3.
    """
    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    h, w = images.shape[-2:]
    x = F.pad(images, (0, -w % 4, 0, -h % 4))
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    x = layer_norm(x.permute(0, 2, 3, 1), "patch_embed.norm")  # (B, H, W, C)
    outputs = []
    for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
        B, H, W, C = x.shape
        Hp, Wp = math.ceil(H / window) * window, math.ceil(W / window) * window
        shift = window // 2
        region = torch.zeros(Hp, Wp)
        count = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[hs, ws] = count
                count += 1
        region_windows = region.view(Hp // window, window, Wp // window, window).permute(0, 2, 1, 3)
        region_windows = region_windows.reshape(-1, window * window)
        shift_mask = (region_windows[:, None, :] != region_windows[:, :, None]).to(x.dtype) * -100.0
        for j in range(depth):
            p = f"layers.{stage}.blocks.{j}"
            s = 0 if j % 2 == 0 else shift
            y = F.pad(layer_norm(x, f"{p}.norm1"), (0, 0, 0, Wp - W, 0, Hp - H))
            if s:
                y = torch.roll(y, (-s, -s), (1, 2))
            win = y.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
            win = win.reshape(-1, window * window, C)
            qkv = F.linear(win, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
            q, k, v = qkv.view(win.shape[0], -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
            table = sd[f"{p}.attn.relative_position_bias_table"]
            index = sd[f"{p}.attn.relative_position_index"]
            attn = attn + table[index.view(-1)].view(window**2, window**2, heads).permute(2, 0, 1)
            if s:
                nw = shift_mask.shape[0]
                attn = (attn.view(B, nw, heads, window**2, window**2) + shift_mask[None, :, None]).flatten(0, 1)
            out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], -1, C)
            out = F.linear(out, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
            out = out.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
            out = out.reshape(B, Hp, Wp, C)
            if s:
                out = torch.roll(out, (s, s), (1, 2))
            x = x + out[:, :H, :W]
            hidden = F.gelu(F.linear(layer_norm(x, f"{p}.norm2"), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
            x = x + F.linear(hidden, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        if stage in (1, 2, 3):
            outputs.append(layer_norm(x, f"norm{stage}").permute(0, 3, 1, 2))
        if stage < len(depths) - 1:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = F.linear(layer_norm(merged, f"layers.{stage}.downsample.norm"),
                         sd[f"layers.{stage}.downsample.reduction.weight"])
    return outputs


def padded_batch(sizes):
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        mask[i, :h, :w] = False
    return images, mask


# ----------------------------------------------------------------------------------------- tests


def test_tiny_swin_any_input_size_shapes_channels_and_masks():
    torch.manual_seed(0)
    backbone = tiny_swin()
    assert backbone.num_channels == [32, 64, 128] and backbone.strides == [8, 16, 32]
    # 101 x 150: not a multiple of the patch (4), stage maps 26x38 / 13x19 / 7x10, none a multiple of 7.
    images, mask = padded_batch([(101, 150), (57, 90)])
    outputs = backbone(images, mask)
    expected = [(13, 19), (7, 10), (4, 5)]
    for (feature, level_mask), channels, hw in zip(outputs, backbone.num_channels, expected):
        assert feature.shape == (2, channels, *hw) and torch.isfinite(feature).all()
        assert level_mask.dtype == torch.bool and level_mask.shape == (2, *hw)
        assert torch.equal(level_mask, F.interpolate(mask[None].float(), size=hw)[0].bool())
        assert not level_mask[0].any() and level_mask[1, -1, -1] and not level_mask[1, 0, 0]
    tiny_input = torch.randn(1, 3, 5, 3)  # smaller than one window at every stage
    shapes = [f.shape[-2:] for f, _ in backbone(tiny_input, torch.zeros(1, 5, 3, dtype=torch.bool))]
    assert shapes == [(1, 1), (1, 1), (1, 1)]


def test_forward_equals_the_official_detection_swin_on_odd_sizes():
    """Our forward (timm modules) vs an independent plain implementation on official names, float64."""
    torch.manual_seed(0)
    backbone = tiny_swin().double().eval()
    for module in backbone.body.modules():  # random output norms, so they are really exercised
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    official = swin_timm_to_official(backbone.body.state_dict())
    images = torch.randn(2, 3, 101, 150, dtype=torch.float64)
    ours = backbone.body(images)
    reference = reference_official_swin(official, images, TINY["depths"], TINY["num_heads"], TINY["window_size"])
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_timm_patch_merging_uses_the_official_channel_order():
    merging = PatchMerging(dim=3)
    x = torch.randn(1, 4, 6, 3)
    official = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    expected = F.linear(merging.norm(official), merging.reduction.weight)
    torch.testing.assert_close(merging(x), expected)


def test_training_step_with_checkpointing_and_drop_path_reaches_every_parameter():
    torch.manual_seed(0)
    backbone = tiny_swin(drop_path_rate=0.3, gradient_checkpointing=True).train()
    assert all(p.requires_grad for p in backbone.parameters())  # the whole Swin trains
    blocks = [block for stage in backbone.body.layers for block in stage.blocks]
    drop_rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in blocks]  # rate 0 is an Identity
    torch.testing.assert_close(torch.tensor(drop_rates), torch.linspace(0, 0.3, 8))
    images, mask = padded_batch([(45, 70)])
    sum(f.square().mean() for f, _ in backbone(images, mask)).backward()
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert unused == []
    # Checkpointing recomputes blocks but must not change the gradients (no drop path here).
    torch.manual_seed(1)
    plain = tiny_swin(gradient_checkpointing=False)
    checkpointed = tiny_swin(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        sum(f.sum() for f, _ in model(images, mask)).backward()
        grads.append(model.body.layers[1].blocks[1].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_official_timm_mapping_is_an_exact_inverse():
    body_state = tiny_swin().body.state_dict()
    official = swin_timm_to_official(body_state)
    assert "layers.0.downsample.reduction.weight" in official and "layers.3.downsample.norm.weight" not in official
    assert torch.equal(official["layers.2.blocks.1.attn.relative_position_index"], relative_position_index(7, 7))
    back = swin_official_to_timm(official)
    assert list(back) == list(body_state)
    assert all(back[k] is body_state[k] for k in body_state)
    again = swin_timm_to_official(back)
    assert list(again) == list(official) and all(torch.equal(again[k], official[k]) for k in official)
    # ImageNet checkpoints' attn_mask buffers depend on the input size and are dropped.
    with_masks = dict(official, **{"layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49)})
    assert swin_official_to_timm(with_masks).keys() == body_state.keys()
    broken = dict(official, **{"layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long)})
    with pytest.raises(ValueError, match="not the standard Swin relative position index"):
        swin_official_to_timm(broken)


def test_swin_l_official_names_shapes_and_parameter_count():
    reference = official_backbone_entries("official_swin_l_state_dict.txt")
    with torch.device("meta"):
        backbone = SwinBackbone()  # the official Swin-L, built without memory
    assert backbone.num_channels == [384, 768, 1536]
    ours = {k: tuple(v.shape) for k, v in backbone.body.state_dict().items()}
    # every official entry (random-free: expanded zeros of the right shape) lands on one of ours
    official = {
        name: (relative_position_index(int(shape[0] ** 0.5), int(shape[0] ** 0.5)) if dtype == "int64"
               else torch.zeros(()).expand(shape))
        for name, (shape, dtype) in reference.items()
    }
    mapped = swin_official_to_timm(official)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    back = swin_timm_to_official(mapped)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: s for k, (s, _) in reference.items()}
    assert all(torch.equal(back[k], official[k]) for k in official if k.endswith("relative_position_index"))

    official_params = sum(math.prod(s) for k, (s, _) in reference.items() if not k.endswith("relative_position_index"))
    assert official_params == 195_200_820
    assert sum(p.numel() for p in backbone.parameters()) == official_params
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == official_params
    blocks = [b for stage in backbone.body.layers for b in stage.blocks]
    assert [b.window_size for b in blocks] == [(12, 12)] * 24  # never shrunk, even on 12x12 maps
    assert [b.shift_size for b in blocks] == [(0, 0) if i % 2 == 0 else (6, 6)
                                              for d in (2, 2, 18, 2) for i in range(d)]
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert backbone.body.gradient_checkpointing


def test_local_official_imagenet_checkpoint_loads_with_a_report(tmp_path, caplog):
    torch.manual_seed(0)
    source = tiny_swin()
    official = swin_timm_to_official(source.body.state_dict())
    # an ImageNet classification checkpoint: no detector norms, a final norm, a head, attn masks
    classification = {k: v for k, v in official.items() if not k.startswith(("norm1.", "norm2.", "norm3."))}
    classification.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128),
                           "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10),
                           "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    path = tmp_path / "swin_tiny_22k.pth"
    torch.save({"model": classification}, path)
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING):
        loaded = tiny_swin(pretrained=str(path))
    assert not caplog.records  # only the expected differences, logged at INFO
    report = loaded.load_report
    assert sorted(report.missing) == [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
    assert report.unexpected == [] and set(report.ignored) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    for name, tensor in loaded.body.state_dict().items():
        if not name.startswith(("norm1.", "norm2.", "norm3.")):
            assert torch.equal(tensor, source.body.state_dict()[name]), name

    # timm-format file, and an official DAC-DETR checkpoint (backbone part extracted)
    torch.save(source.body.state_dict(), path)
    assert tiny_swin(pretrained=path).load_report.missing == []
    detector = {f"backbone.0.body.{k}": v for k, v in official.items()}
    detector["transformer.level_embed"] = torch.zeros(4, 256)
    torch.save({"model": detector}, path)
    report = tiny_swin(pretrained=path).load_report
    assert report.missing == [] and report.unexpected == []

    # a genuinely unexpected and a genuinely missing key are warned about by name
    partial = {k: v for k, v in source.body.state_dict().items() if k != "layers.3.blocks.0.mlp.fc2.bias"}
    partial["layers.9.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with caplog.at_level(logging.WARNING):
        tiny_swin(pretrained=path)
    assert "layers.3.blocks.0.mlp.fc2.bias" in caplog.text and "layers.9.weight" in caplog.text


def test_bias_tables_are_interpolated_for_another_window_and_heads_mismatch_is_an_error(tmp_path, caplog):
    path = tmp_path / "window7.pth"
    torch.save(tiny_swin().body.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="dac_detr.models.swin"):
        loaded = tiny_swin(window_size=5, pretrained=path)
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    assert loaded.body.layers[0].blocks[0].attn.relative_position_bias_table.shape == (81, 1)
    assert "interpolated layers.0.blocks.0.attn.relative_position_bias_table" in caplog.text
    with pytest.raises(ValueError, match="shape mismatches"):
        tiny_swin(num_heads=(2, 2, 4, 8), pretrained=path)


def test_missing_file_unknown_model_and_bad_architecture_give_clear_errors(tmp_path):
    missing = tmp_path / "swin_large_patch4_window12_384_22k.pth"
    with pytest.raises(PretrainedWeightsUnavailable, match="backbone.pretrained=") as error:
        tiny_swin(pretrained=missing)
    assert str(missing) in str(error.value)
    with pytest.raises(ValueError, match="unknown timm model 'swin_huge'"):
        SwinBackbone("swin_huge")
    with pytest.raises(ValueError, match="4 stages"):
        SwinBackbone(embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4))


def test_hub_weights_offline_name_the_file_to_download(tmp_path, monkeypatch):
    huggingface_constants = pytest.importorskip("huggingface_hub.constants")
    # huggingface_hub's own offline switch, and an empty cache: a real, immediate failure.
    monkeypatch.setattr(huggingface_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        SwinBackbone("swin_tiny_patch4_window7_224.ms_in1k", pretrained="timm",
                     embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    message = str(error.value)
    storage = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    assert storage + "swin_tiny_patch4_window7_224.pth" in message
    assert "backbone.pretrained=/path/to/swin_tiny_patch4_window7_224.pth" in message
    assert "swin_large_patch4_window12_384_22k.pth" in message


def test_hydra_configs_instantiate():
    tiny = instantiate(OmegaConf.load(REPO / "conf" / "backbone" / "swin_tiny.yaml"))
    assert isinstance(tiny, SwinBackbone) and tiny.num_channels == [64, 128, 256]
    large = OmegaConf.load(REPO / "conf" / "backbone" / "swin_l.yaml")
    assert large.pretrained == "timm" and large.model_name == "swin_large_patch4_window12_384.ms_in22k"
    large.pretrained = None
    with torch.device("meta"):
        backbone = instantiate(large)
    assert backbone.num_channels == [384, 768, 1536]
    assert sum(p.numel() for p in backbone.parameters()) == 195_200_820
