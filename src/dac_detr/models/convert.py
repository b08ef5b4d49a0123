"""Import official DAC-DETR checkpoints (huzhengdongcs/DAC-DETR, R50 and Swin-L).

Our module names equal the official ones except for two things:
* the official model registers every head twice, as ``class_embed.N`` / ``bbox_embed.N`` and as
  the aliases ``transformer.decoder.class_embed.N`` / ``transformer.decoder.bbox_embed.N`` (the
  same tensors); we keep one copy, after checking that the aliases are equal;
* the backbone is ``backbone.0.body.*`` there (a Joiner around it) and ``backbone.body.*`` here;
  Swin bodies additionally go through ``swin_official_to_timm`` (our Swin is timm's).

Checkpoints are read with ``torch.load(weights_only=True)``: no code from the file runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, compare_state_dicts, read_checkpoint_file

OFFICIAL_BACKBONE_PREFIX = "backbone.0.body."
OUR_BACKBONE_PREFIX = "backbone.body."
HEAD_ALIAS_PREFIXES = {"transformer.decoder.class_embed.": "class_embed.",
                       "transformer.decoder.bbox_embed.": "bbox_embed."}
# entries every official DAC-DETR model has, whatever the backbone
OFFICIAL_MARKERS = ("transformer.level_embed", "class_embed.0.weight", "transformer.decoder.class_embed.0.weight",
                    "label_enc.weight")


class NotAnOfficialCheckpointError(CheckpointError):
    """The file or state dict is not an official DAC-DETR checkpoint."""


def is_official_state_dict(state_dict: Mapping[str, object]) -> bool:
    return all(k in state_dict for k in OFFICIAL_MARKERS) and any(
        k.startswith(OFFICIAL_BACKBONE_PREFIX) for k in state_dict)


def backbone_kind(state_dict: Mapping[str, object], prefix: str) -> str:
    """'swin' or 'resnet', from the body's own key names."""
    if f"{prefix}patch_embed.proj.weight" in state_dict:
        return "swin"
    if f"{prefix}layer1.0.conv1.weight" in state_dict:
        return "resnet"
    raise NotAnOfficialCheckpointError(
        f"unknown backbone: neither a Swin ({prefix}patch_embed.*) nor a ResNet ({prefix}layer1.*) body")


def official_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official model state dict -> ours (every entry mapped; raises on a non-official dict)."""
    if not is_official_state_dict(state_dict):
        missing = [k for k in OFFICIAL_MARKERS if k not in state_dict]
        raise NotAnOfficialCheckpointError(
            "this is not an official DAC-DETR state dict: "
            + (f"it lacks {missing}" if missing else f"it has no '{OFFICIAL_BACKBONE_PREFIX}*' entries")
            + ". Expected the 'model' entry of a checkpoint saved by the official main.py "
              "(github.com/huzhengdongcs/DAC-DETR). Our own checkpoints load directly (no conversion).")
    kind = backbone_kind(state_dict, OFFICIAL_BACKBONE_PREFIX)
    out: dict[str, Tensor] = {}
    body: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        alias = _head_alias(key)
        if alias is not None:
            if alias not in state_dict:
                raise NotAnOfficialCheckpointError(f"'{key}' has no primary copy '{alias}'")
            if not torch.equal(value, state_dict[alias]):
                raise NotAnOfficialCheckpointError(
                    f"'{key}' differs from '{alias}': the official model shares these tensors, so the file is "
                    "corrupt or was edited")
            continue
        if key.startswith(OFFICIAL_BACKBONE_PREFIX):
            body[key[len(OFFICIAL_BACKBONE_PREFIX):]] = value
        else:
            out[key] = value
    if kind == "swin":
        from .backbone import swin_official_to_timm

        body = swin_official_to_timm(body)
    out.update({OUR_BACKBONE_PREFIX + k: v for k, v in body.items()})
    return out


def ours_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the official layout, head aliases included (exact inverse of the above)."""
    out: dict[str, Tensor] = {}
    body: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(OUR_BACKBONE_PREFIX):
            body[key[len(OUR_BACKBONE_PREFIX):]] = value
        else:
            out[key] = value
    if backbone_kind(body, "") == "swin":
        from .backbone import swin_timm_to_official

        body = swin_timm_to_official(body)
    out.update({OFFICIAL_BACKBONE_PREFIX + k: v for k, v in body.items()})
    for alias_prefix, primary_prefix in HEAD_ALIAS_PREFIXES.items():
        for key in [k for k in out if k.startswith(primary_prefix)]:
            out[alias_prefix + key[len(primary_prefix):]] = out[key]
    return out


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The official model state dict from a checkpoint file ({'model': sd, 'args': ...} or a bare sd).

    Read with ``weights_only=True``. The official main.py also pickles its ``argparse.Namespace``
    under 'args', which the safe loader refuses by default; that one class only carries plain
    values, so it is allow-listed (nothing else is) and only 'model' is kept. A missing or
    unreadable file is a NotAnOfficialCheckpointError too (a CheckpointError: the entry points
    print its message alone).
    """
    checkpoint = read_checkpoint_file(
        path,
        error=NotAnOfficialCheckpointError,
        allowed_globals=[argparse.Namespace],
        fix="Give the .pth file saved by the official main.py.",
    )
    if isinstance(checkpoint, Mapping) and "model" in checkpoint:
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not is_official_state_dict(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise NotAnOfficialCheckpointError(
            f"{path} is not an official DAC-DETR checkpoint (found {found}). Expected a file saved by the "
            "official main.py, whose 'model' entry holds 'transformer.*', 'class_embed.*' and "
            "'backbone.0.body.*' weights.")
    return dict(checkpoint)


def load_official(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Tensor], assign: bool = False) -> None:
    """Convert and load strictly into ``model``; a clear error lists missing / unexpected / mis-shaped keys.

    ``assign=True`` uses the checkpoint tensors as the parameters instead of copying into them,
    e.g. for a model built on the meta device (no random init, no second copy of Swin-L).
    """
    official = (path_or_state_dict if isinstance(path_or_state_dict, Mapping)
                else read_official_checkpoint(path_or_state_dict))
    ours = official_to_ours(official)
    diff = compare_state_dicts(model.state_dict(), ours)
    if not diff.complete:
        raise CheckpointError(
            "the official checkpoint does not fit this model (build it with the official sizes: "
            f"num_classes=91, 900 queries, 4 levels, the matching backbone):\n{diff.listing(10)}")
    model.load_state_dict(ours, strict=True, assign=assign)


def convert_official_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Tensor]:
    """Read an official checkpoint and save our state dict as ``{'model': state_dict}`` to ``dst``."""
    ours = official_to_ours(read_official_checkpoint(src))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": ours}, dst)
    return ours


def _head_alias(key: str) -> str | None:
    for alias_prefix, primary_prefix in HEAD_ALIAS_PREFIXES.items():
        if key.startswith(alias_prefix):
            return primary_prefix + key[len(alias_prefix):]
    return None
