"""Backbones of the detector: torchvision ResNet with frozen BatchNorm, and Swin (in ``swin.py``).

Both return the stride-8/16/32 maps with their padding masks (docs/method.md, Backbone):

    backbone = ResNetBackbone("resnet50", pretrained="torchvision")
    for feature, mask in backbone(images, pixel_mask):   # (B, C_i, h_i, w_i), (B, h_i, w_i)
        ...
    backbone.num_channels  # [512, 1024, 2048]
    backbone.strides       # [8, 16, 32]

``backbone.body`` carries the weights under the official state-dict names (the official
checkpoint stores them as ``backbone.0.body.<name>``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from dac_detr.models.backbone_common import (
    BackboneBase,
    LoadReport,
    PretrainedWeightsUnavailable,
    load_matching_weights,
    read_checkpoint,
)
from dac_detr.models.swin import SwinBackbone, swin_official_to_timm, swin_timm_to_official

__all__ = [
    "ResNetBackbone",
    "SwinBackbone",
    "swin_official_to_timm",
    "swin_timm_to_official",
    "PretrainedWeightsUnavailable",
]

log = logging.getLogger(__name__)

# depth-name -> (channels of layer2, layer3, layer4). Basic-block nets are 4x narrower.
RESNET_CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "resnet152": [512, 1024, 2048],
}
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
# The checkpoint the official code loads for R50 (torchvision's original ImageNet weights).
OFFICIAL_R50_FILE = "resnet50-19c8e357.pth"


class ResNetBody(nn.Module):
    """The convolutional trunk of a torchvision ResNet, without the pooling head and ``fc``.

    Its state-dict names are torchvision's (``conv1, bn1, layer1..layer4``), i.e. the official
    checkpoint's names after the ``backbone.0.body.`` prefix.
    """

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> [layer2 (B, C2, H/8, W/8), layer3 (.., H/16), layer4 (.., H/32)].

        Each stride-2 step rounds up, so odd sizes give ceil(H / stride).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class ResNetBackbone(BackboneBase):
    """torchvision ResNet with FrozenBatchNorm2d everywhere, returning layer2-4 (strides 8/16/32).

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` (the official), ``resnet101`` or ``resnet152``.
        pretrained: ``None`` for random init; ``"torchvision"`` for torchvision's ImageNet
            IMAGENET1K_V1 weights (downloaded, or read from torch.hub's cache); or the path of a
            local torchvision-format state dict (e.g. ``resnet50-19c8e357.pth``, a plain dict or one
            under a ``'model'`` / ``'state_dict'`` key).
        train_layers: stages whose parameters train; all others (the stem, and ``layer1`` by
            default) get ``requires_grad=False``. BatchNorm never trains: its statistics and
            affine terms are buffers.
        bn_eps: epsilon of the frozen BatchNorm (torchvision's 1e-5, as the official code).
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: str | os.PathLike | None = None,
        train_layers: Sequence[str] = ("layer2", "layer3", "layer4"),
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(
                f"unknown ResNet '{name}'; choose one of {sorted(RESNET_CHANNELS)}"
            )
        train_layers = tuple(train_layers)
        unknown = [layer for layer in train_layers if layer not in RESNET_STAGES]
        if unknown:
            raise ValueError(
                f"train_layers {unknown} are not ResNet stages; use a subset of {list(RESNET_STAGES)}"
            )
        self.name = name
        self.train_layers = train_layers

        def frozen_bn(num_features: int) -> FrozenBatchNorm2d:
            return FrozenBatchNorm2d(num_features, eps=bn_eps)

        resnet = getattr(torchvision.models, name)(
            weights=None,
            norm_layer=frozen_bn,
            replace_stride_with_dilation=[False, False, False],
        )
        self.body = ResNetBody(resnet)
        self.num_channels = list(RESNET_CHANNELS[name])
        self.strides = [8, 16, 32]

        self.load_report: LoadReport | None = None
        if pretrained is not None:
            self.load_report = self.load_pretrained(pretrained)

        for param_name, param in self.body.named_parameters():
            if not param_name.startswith(tuple(f"{layer}." for layer in train_layers)):
                param.requires_grad_(False)

    def extract_features(self, images: Tensor) -> list[Tensor]:
        return self.body(images)

    def load_pretrained(self, pretrained: str | os.PathLike) -> LoadReport:
        """Load ImageNet weights into ``self.body``; returns what matched (also logged)."""
        if str(pretrained) == "torchvision":
            state_dict, source = _download_torchvision_weights(self.name)
        else:
            state_dict = read_checkpoint(pretrained, what=self.name, config_key="backbone.pretrained")
            source = os.fspath(pretrained)
            # A whole detector checkpoint (e.g. an official DAC-DETR one): keep its backbone part.
            prefix = "backbone.0.body."
            if any(key.startswith(prefix) for key in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        # The classifier head is not part of the backbone; num_batches_tracked is not kept by
        # FrozenBatchNorm2d. Both are expected in ImageNet checkpoints, so they are not "unexpected".
        return load_matching_weights(
            self.body,
            state_dict,
            source=source,
            ignore=lambda key: key.startswith("fc.") or key.endswith(".num_batches_tracked"),
        )


def _download_torchvision_weights(name: str) -> tuple[dict[str, Tensor], str]:
    """torchvision's IMAGENET1K_V1 weights for ``name`` via torch.hub (cache first, then network)."""
    enum_name = f"ResNet{name[len('resnet'):]}_Weights"
    weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    file_name = os.path.basename(weights.url)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            weights.url, model_dir=cache_dir, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as error:  # noqa: BLE001 - network errors come in many types; re-raised with the fix
        official = (
            f" The official DAC-DETR code uses '{OFFICIAL_R50_FILE}' "
            f"(https://download.pytorch.org/models/{OFFICIAL_R50_FILE}), which works as well."
            if name == "resnet50"
            else ""
        )
        raise PretrainedWeightsUnavailable(
            f"could not download torchvision's ImageNet weights for {name} "
            f"({type(error).__name__}: {error}). Download {weights.url} on a machine with internet "
            f"access and either put it at {os.path.join(cache_dir, file_name)} or set "
            f"backbone.pretrained=/path/to/{file_name}.{official} Set backbone.pretrained=null to "
            "train from random initialisation."
        ) from error
    return state_dict, weights.url
