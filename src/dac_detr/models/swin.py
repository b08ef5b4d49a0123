"""Swin Transformer backbone (docs/method.md, Backbone): timm's Swin modules, run with the official
detection forward.

The modules and weights are timm's (``timm.create_model``), so timm's model names, hub weights
and architecture arguments all work. The forward pass, though, follows the official
detection Swin that DAC-DETR (and H-DETR, DINO) use, because timm's differs on inputs whose
feature maps are not a multiple of the window, i.e. almost every DETR image:

* every block pads its (LayerNorm-ed) input to a multiple of the window with zeros *before*
  the cyclic shift, and the shift mask is built on the padded map (timm shifts first, then
  pads, so the mask regions no longer line up with the rolled tokens);
* every odd block shifts by window // 2 even when the map is smaller than the window
  (timm's ``always_partition=True`` keeps the window and shift at their configured size).

Stage outputs 1-3 (before the next stage's patch merging) pass through an extra LayerNorm each,
``norm1, norm2, norm3``, as in the official code.

State-dict names of ``SwinBackbone.body`` are timm's; the official checkpoint differs in two
ways, undone by :func:`swin_official_to_timm` / :func:`swin_timm_to_official`:

* the official code owns the patch merging at the *end* of stage i (``layers.i.downsample``,
  i = 0..2), timm at the *start* of stage i+1 (``layers.{i+1}.downsample``);
* the official ``relative_position_index`` is a persistent buffer (in the checkpoint), timm's
  is not. Official ImageNet checkpoints also store ``attn_mask`` buffers, which depend on the
  input size and are dropped.

The patch-merging channel order (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) is
the same in both (timm's reshape reproduces it), so weights need no permutation; a test checks it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Mapping

import timm
import torch
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dac_detr.models.backbone_common import (
    BackboneBase,
    LoadReport,
    PretrainedWeightsUnavailable,
    load_matching_weights,
    read_checkpoint,
)

log = logging.getLogger(__name__)

# The official DAC-DETR Swin-L initialisation (ImageNet-22k, 384 px, window 12).
OFFICIAL_SWIN_L_URL = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_large_patch4_window12_384_22k.pth"
)
# The official detection Swin returns stages 1, 2, 3 (strides 8, 16, 32).
OUT_STAGES = (1, 2, 3)


class SwinBody(nn.Module):
    """Patch embedding, the four Swin stages (timm modules) and the extra output LayerNorms.

    Args:
        swin: a timm ``SwinTransformer`` built with ``always_partition=True``; its ``patch_embed``
            and ``layers`` are kept, its classifier ``norm`` and ``head`` are not.
        gradient_checkpointing: recompute every block in the backward pass (saves memory).
    """

    def __init__(self, swin: nn.Module, gradient_checkpointing: bool = True):
        super().__init__()
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.patch_size = tuple(swin.patch_embed.patch_size)
        self.gradient_checkpointing = gradient_checkpointing
        stage_channels = [info["num_chs"] for info in swin.feature_info]
        for stage in OUT_STAGES:
            self.add_module(f"norm{stage}", nn.LayerNorm(stage_channels[stage]))
        self.num_channels = [stage_channels[stage] for stage in OUT_STAGES]

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) of any size -> [(B, C_s, h_s, w_s) for stages 1, 2, 3].

        h_1 = ceil(ceil(H / 4) / 2) and each further stage halves (rounding up).
        """
        height, width = images.shape[-2:]
        # Pad right/bottom to a multiple of the patch size, as the official PatchEmbed does.
        pad_h = -height % self.patch_size[0]
        pad_w = -width % self.patch_size[1]
        x = self.patch_embed(F.pad(images, (0, pad_w, 0, pad_h)))  # (B, h, w, C), channels last
        outputs = []
        for index, stage in enumerate(self.layers):
            if not isinstance(stage.downsample, nn.Identity):  # timm: stages 1-3 start by merging
                x = patch_merging_forward(stage.downsample, x)
            x = self._run_blocks(stage.blocks, x)
            if index in OUT_STAGES:
                norm = getattr(self, f"norm{index}")
                outputs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outputs

    def _run_blocks(self, blocks: nn.Sequential, x: Tensor) -> Tensor:
        window, shift = blocks[0].window_size, _shift_of(blocks)
        height, width = x.shape[1:3]
        # One shift mask per stage, for the map padded to whole windows (all blocks share it).
        mask = None
        if any(shift):
            mask = shifted_window_mask(height, width, window, shift, device=x.device, dtype=x.dtype)
        for block in blocks:
            block_mask = mask if any(block.shift_size) else None
            if self.gradient_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(swin_block_forward, block, x, block_mask, use_reentrant=False)
            else:
                x = swin_block_forward(block, x, block_mask)
        return x


def _shift_of(blocks: nn.Sequential) -> tuple[int, int]:
    """The shift of the stage's shifted blocks (every odd block); zeros if the stage has only one."""
    for block in blocks:
        if any(block.shift_size):
            return tuple(block.shift_size)
    return (0, 0)


def swin_block_forward(block: nn.Module, x: Tensor, shift_mask: Tensor | None) -> Tensor:
    """One Swin block with the official detection semantics (pad, then shift).

    Args:
        block: a timm ``SwinTransformerBlock`` (its norm1, attn, mlp, norm2, drop paths are used).
        x: (B, H, W, C) tokens, any H and W.
        shift_mask: (num_windows, window_area, window_area) additive mask, or None for a
            non-shifted block.

    Returns:
        (B, H, W, C).
    """
    height, width = x.shape[1:3]
    window_h, window_w = block.window_size
    shift_h, shift_w = block.shift_size
    shortcut = x
    x = block.norm1(x)
    pad_h, pad_w = -height % window_h, -width % window_w
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # padded tokens are exact zeros after the norm
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
    windows = window_partition(x, (window_h, window_w))  # (B * nW, window_area, C)
    windows = block.attn(windows, mask=shift_mask if (shift_h or shift_w) else None)
    x = window_merge(windows, (window_h, window_w), height + pad_h, width + pad_w)
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    x = x[:, :height, :width, :]
    x = shortcut + block.drop_path1(x)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x


def patch_merging_forward(merging: nn.Module, x: Tensor) -> Tensor:
    """2x2 patch merging, (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out), as the official code does.

    Odd sizes are zero-padded bottom/right. The four neighbours are concatenated as
    x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (the order of the official and
    timm weights), then LayerNorm and the bias-free linear reduction of timm's ``PatchMerging``
    are applied. Written out here because older timm releases (e.g. 1.0.8) pad odd sizes the wrong way.
    """
    height, width = x.shape[1:3]
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return merging.reduction(merging.norm(x))


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B * num_windows, window_area, C)."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def window_merge(windows: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, window_area, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window[0], width // window[1], window[0], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: tuple[int, int],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Additive attention mask of the shifted windows on a map padded to whole windows.

    After the cyclic shift a window can hold tokens from up to four areas that were not
    adjacent in the image; tokens only attend within their own area (others get -100).

    Returns:
        (num_windows, window_area, window_area) of 0 / -100.
    """
    padded_h = height + (-height % window[0])
    padded_w = width + (-width % window[1])
    area_id = torch.zeros(1, padded_h, padded_w, 1, device=device)
    area = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0] or None), slice(-shift[0] or None, None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1] or None), slice(-shift[1] or None, None)):
            area_id[:, rows, cols, :] = area
            area += 1
    area_windows = window_partition(area_id, window).squeeze(-1)  # (nW, window_area)
    different = area_windows[:, None, :] != area_windows[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)


class SwinBackbone(BackboneBase):
    """Swin Transformer (timm) returning stages 1-3 (strides 8/16/32) with an extra LayerNorm each.

    Args:
        model_name: timm model name, optionally with a pretrained tag; the default is the
            official Swin-L (embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12).
        pretrained: ``None`` (random init); ``"timm"`` for timm's hub weights of ``model_name``
            (e.g. ``swin_large_patch4_window12_384.ms_in22k``, the official initialisation);
            or the path of a local checkpoint in the official format (``..._22k.pth`` with a
            ``'model'`` key, or an official DAC-DETR checkpoint) or timm's format.
        embed_dim, depths, num_heads, window_size: architecture overrides (``None`` keeps
            ``model_name``'s), e.g. a tiny random Swin for tests.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks (0.2 for the
            official 12-epoch Swin-L run, 0.5 for 24 epochs).
        gradient_checkpointing: recompute each block in backward (official ``use_checkpoint``).
        pretrain_img_size: the image size timm builds for; any input size works regardless.
    """

    def __init__(
        self,
        model_name: str = "swin_large_patch4_window12_384.ms_in22k",
        pretrained: str | os.PathLike | None = None,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        window_size: int | None = None,
        drop_path_rate: float = 0.2,
        gradient_checkpointing: bool = True,
        pretrain_img_size: int = 384,
    ):
        super().__init__()
        overrides = _architecture_overrides(embed_dim, depths, num_heads, window_size)
        use_hub = pretrained is not None and str(pretrained) == "timm"
        swin = _create_timm_swin(model_name, use_hub, overrides, img_size=pretrain_img_size,
                                 drop_path_rate=drop_path_rate)
        self.model_name = model_name
        self.body = SwinBody(swin, gradient_checkpointing=gradient_checkpointing)
        self.num_channels = list(self.body.num_channels)
        self.strides = [8, 16, 32]
        self.load_report: LoadReport | None = None
        if use_hub:
            log.info("Swin weights from timm's hub (%s); the output norms norm1-3 are initialised fresh",
                     model_name)
        elif pretrained is not None:
            self.load_report = self.load_pretrained(pretrained)

    def extract_features(self, images: Tensor) -> list[Tensor]:
        return self.body(images)

    def load_pretrained(self, path: str | os.PathLike) -> LoadReport:
        """Load a local Swin checkpoint (official or timm names) into ``self.body``."""
        state_dict = read_checkpoint(path, what=self.model_name, config_key="backbone.pretrained")
        prefix = "backbone.0.body."
        if any(key.startswith(prefix) for key in state_dict):  # a whole DAC-DETR checkpoint
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_official_swin_state_dict(state_dict):
            state_dict = swin_official_to_timm(state_dict)
        state_dict = self._resize_bias_tables(state_dict)
        return load_matching_weights(
            self.body,
            state_dict,
            source=os.fspath(path),
            # ImageNet checkpoints carry the classifier's final norm and head.
            ignore=lambda key: key.startswith(("head.", "norm.")),
            # The output norms exist only in the detector; classification checkpoints lack them.
            expected_missing=lambda key: re.fullmatch(r"norm[123]\.(weight|bias)", key) is not None,
        )

    def _resize_bias_tables(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Interpolate relative-position bias tables trained for another window size."""
        own = self.body.state_dict()
        resized = dict(state_dict)
        for key, table in state_dict.items():
            if not key.endswith("relative_position_bias_table") or key not in own:
                continue
            target = own[key].shape
            if table.shape == target or table.shape[1] != target[1]:
                continue  # equal, or a head-count mismatch that the loader reports as an error
            window = self.body.get_submodule(key.rsplit(".", 1)[0]).window_size
            resized[key] = resize_rel_pos_bias_table(table, new_window_size=window, new_bias_shape=target)
            log.info("interpolated %s from %s to %s (window %s)", key, tuple(table.shape), tuple(target), window)
        return resized


def _architecture_overrides(embed_dim: int | None, depths: Sequence[int] | None, num_heads: Sequence[int] | None,
                            window_size: int | None) -> dict[str, Any]:
    """The timm keyword arguments of the given (not ``None``) overrides, sequences as tuples."""
    if depths is not None and len(tuple(depths)) != 4:
        raise ValueError(f"Swin needs 4 stages (stages 1-3 are returned); got depths={list(depths)}")
    if depths is not None and num_heads is not None and len(tuple(num_heads)) != len(tuple(depths)):
        raise ValueError(
            f"num_heads {list(num_heads)} must give one head count per stage of depths {list(depths)}"
        )
    return {
        key: (tuple(value) if isinstance(value, Sequence) else value)
        for key, value in dict(
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size
        ).items()
        if value is not None
    }


def _create_timm_swin(model_name: str, use_hub: bool, overrides: dict[str, Any], img_size: int,
                      drop_path_rate: float) -> nn.Module:
    """timm's Swin without classifier, hub weights when ``use_hub``; failures as clear errors."""
    try:
        return timm.create_model(
            model_name,
            pretrained=use_hub,
            num_classes=0,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            strict_img_size=False,  # any input size; patch padding is done in SwinBody
            always_partition=True,  # keep the configured window and shift (official behaviour)
            **overrides,
        )
    except Exception as error:  # noqa: BLE001 - sorted into clear messages below
        if isinstance(error, RuntimeError) and "Unknown model" in str(error):
            raise ValueError(
                f"unknown timm model '{model_name}'; use a Swin name such as "
                "swin_large_patch4_window12_384 (see timm.list_models('swin*'))"
            ) from error
        if use_hub and "Error(s) in loading state_dict" in str(error):
            raise ValueError(
                f"timm's pretrained weights for '{model_name}' do not fit the configured "
                f"architecture ({error}). Remove the embed_dim/depths/num_heads overrides or "
                "set backbone.pretrained=null."
            ) from error
        if use_hub:  # network or cache failures come in many exception types
            raise _hub_error(model_name, error) from error
        raise


def _hub_error(model_name: str, error: Exception) -> PretrainedWeightsUnavailable:
    """The offline error: names the file that holds ``model_name``'s weights and the config key."""
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - only used to make the message more precise
        pretrained_cfg = None
    url = getattr(pretrained_cfg, "url", None) or OFFICIAL_SWIN_L_URL
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    mirror = f" (also on https://huggingface.co/{hub_id})" if hub_id else ""
    return PretrainedWeightsUnavailable(
        f"could not fetch timm's pretrained weights for '{model_name}' "
        f"({type(error).__name__}: {error}). Offline, download {url}{mirror} on a machine with "
        f"internet access and set backbone.pretrained=/path/to/{os.path.basename(url)} "
        f"(the official DAC-DETR Swin-L starts from {os.path.basename(OFFICIAL_SWIN_L_URL)}). "
        "Set backbone.pretrained=null to train from random initialisation."
    )


# --------------------------------------------------------------------------- name mapping

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def is_official_swin_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Official Swin owns a patch merging in stage 0; timm's stage 0 has none."""
    return any(key.startswith("layers.0.downsample.") for key in state_dict)


def swin_official_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Swin names (relative to ``body.``) -> ours (timm's).

    ``layers.i.downsample.*`` -> ``layers.{i+1}.downsample.*``; ``relative_position_index``
    buffers are checked against the standard index and dropped (timm recomputes them);
    ``attn_mask`` buffers of ImageNet checkpoints are dropped. Every other name is unchanged.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("attn_mask"):
            continue
        if key.endswith("relative_position_index"):
            window = _window_of_index(value)
            if value.device.type != "meta" and not torch.equal(value.cpu(), relative_position_index(window, window)):
                raise ValueError(
                    f"'{key}' is not the standard Swin relative position index for window "
                    f"{window}; this checkpoint is not an official Swin one"
                )
            continue
        converted[_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)] = value
    return converted


def swin_timm_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Ours (timm's names) -> official Swin names; the exact inverse of :func:`swin_official_to_timm`.

    ``layers.{i+1}.downsample.*`` -> ``layers.i.downsample.*``; after every
    ``relative_position_bias_table`` the official ``relative_position_index`` buffer is
    inserted (int64, (window², window²)), with the window read off the table's size.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _DOWNSAMPLE.match(key)
        if match:
            stage = int(match.group(1))
            if stage == 0:
                raise ValueError(f"'{key}': timm's stage 0 has no patch merging; is this an official state dict?")
            key = f"layers.{stage - 1}.downsample." + key[match.end():]
        converted[key] = value
        if key.endswith("relative_position_bias_table"):
            window = _window_of_table(value)
            index_key = key[: -len("relative_position_bias_table")] + "relative_position_index"
            converted[index_key] = relative_position_index(window, window).to(value.device)
    return converted


def relative_position_index(window_h: int, window_w: int) -> Tensor:
    """(window_h*window_w, window_h*window_w) int64: row of the bias table for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2): dy, dx
    return (relative[..., 0] + window_h - 1) * (2 * window_w - 1) + (relative[..., 1] + window_w - 1)


def _window_of_table(table: Tensor) -> int:
    side = round((table.shape[0] ** 0.5 + 1) / 2)  # the table has (2w - 1)² rows
    if (2 * side - 1) ** 2 != table.shape[0]:
        raise ValueError(f"relative position bias table with {table.shape[0]} rows is not (2w-1)² for a square window")
    return side


def _window_of_index(index: Tensor) -> int:
    side = round(index.shape[0] ** 0.5)
    if side * side != index.shape[0] or index.shape[0] != index.shape[-1]:
        raise ValueError(f"relative position index of shape {tuple(index.shape)} is not (w², w²)")
    return side
