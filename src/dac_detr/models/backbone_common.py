"""What every backbone shares: input checks, per-level padding masks, and pretrained-weight loading.

The detector only relies on the contract of :class:`BackboneBase`:
``forward(images, pixel_mask) -> [(feature, mask), ...]`` for strides 8, 16, 32, plus the
``num_channels`` and ``strides`` attributes and a ``body`` submodule holding the weights.
"""

from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, compare_state_dicts, read_checkpoint_file

log = logging.getLogger(__name__)


class BackboneBase(nn.Module, abc.ABC):
    """Common wrapper: a feature extractor ``body`` plus the padding masks of its outputs.

    Subclasses set ``self.body``, ``self.num_channels`` and ``self.strides`` and implement
    :meth:`extract_features`.
    """

    num_channels: list[int]
    strides: list[int]

    @abc.abstractmethod
    def extract_features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> one feature map (B, C_i, h_i, w_i) per returned stride."""

    def forward(self, images: Tensor, pixel_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Run the backbone and resize the padding mask to every returned map.

        Args:
            images: float (B, 3, H, W), zero-padded bottom-right to the batch maximum.
            pixel_mask: bool (B, H, W), True on padding.

        Returns:
            A list with one ``(feature (B, C_i, h_i, w_i), mask (B, h_i, w_i) bool)`` pair per
            stride in ``self.strides`` (8, 16, 32). Masks are True on padding.
        """
        check_backbone_inputs(images, pixel_mask)
        features = self.extract_features(images)
        return [(feature, resize_padding_mask(pixel_mask, feature.shape[-2:])) for feature in features]


def check_backbone_inputs(images: Tensor, pixel_mask: Tensor) -> None:
    """Fail early with a readable message instead of a shape error deep inside a conv."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"backbone expects images of shape (B, 3, H, W), got {shape}; "
            "batch RGB images with dac_detr.data's collate function"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"backbone expects float images (ImageNet-normalised), got dtype {images.dtype}; "
            "convert and normalise them first"
        )
    if not isinstance(pixel_mask, Tensor) or pixel_mask.dim() != 3:
        shape = tuple(pixel_mask.shape) if isinstance(pixel_mask, Tensor) else type(pixel_mask).__name__
        raise ValueError(f"backbone expects pixel_mask of shape (B, H, W), got {shape}")
    if pixel_mask.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"pixel_mask shape {tuple(pixel_mask.shape)} does not match images "
            f"{tuple(images.shape)}: it must be (B, H, W) of the padded batch"
        )
    if pixel_mask.dtype != torch.bool:
        raise ValueError(
            f"pixel_mask must be bool (True on padding), got dtype {pixel_mask.dtype}"
        )


def resize_padding_mask(pixel_mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(B, H, W) bool -> (B, h, w) bool, nearest-neighbour resize as the official code does.

    Bit-identical to ``F.interpolate(mask[None].float(), size)`` (mode "nearest": source index
    ``min(floor(i * float32(in / out)), in - 1)``), written as two index gathers so an ONNX export
    computes the same indices: ONNX ``Resize`` derives them from ``out / in`` and rounds differently
    (e.g. 300 -> 5 columns: it reads column 239 where PyTorch reads 240).
    """
    rows = _nearest_indices(pixel_mask.shape[-2], size[0], pixel_mask.device)
    cols = _nearest_indices(pixel_mask.shape[-1], size[1], pixel_mask.device)
    return pixel_mask[:, rows][:, :, cols]


def _nearest_indices(in_size, out_size, device: torch.device) -> Tensor:
    """Source index of every output position of ATen's nearest resize (float32 scale in / out)."""
    scale = torch.full((), in_size, dtype=torch.float32, device=device) / torch.full(
        (), out_size, dtype=torch.float32, device=device)
    index = torch.floor(torch.arange(out_size, dtype=torch.float32, device=device) * scale).long()
    return index.clamp(max=in_size - 1)


# --------------------------------------------------------------------------- pretrained weights


class PretrainedWeightsUnavailable(CheckpointError, RuntimeError):
    """Pretrained weights were asked for but cannot be read or downloaded."""


@dataclass
class LoadReport:
    """What :func:`load_matching_weights` did: keys loaded, missing, unexpected and ignored."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_checkpoint(path: str | os.PathLike, *, what: str, config_key: str) -> dict[str, Tensor]:
    """Read a state dict from a local file (``torch.load(weights_only=True)``).

    Accepts a plain state dict or a dict holding it under ``'model'`` or ``'state_dict'``.
    ``what`` and ``config_key`` only make the error messages precise.
    """
    checkpoint = read_checkpoint_file(
        path,
        error=PretrainedWeightsUnavailable,
        fix=f"Pretrained {what} weights: put a state-dict .pth file there and set {config_key}=<path to the .pth "
        f"file> (or {config_key}=null for random init).",
    )
    return unwrap_state_dict(checkpoint, source=os.fspath(path))


def unwrap_state_dict(checkpoint: object, *, source: str) -> dict[str, Tensor]:
    """Return the tensor dict inside a checkpoint (plain, ``{'model': ...}`` or ``{'state_dict': ...}``)."""
    if isinstance(checkpoint, Mapping):
        for key in ("model", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise PretrainedWeightsUnavailable(
            f"'{source}' is not a state dict (a mapping of names to tensors, possibly under a "
            "'model' or 'state_dict' key)"
        )
    state_dict = dict(checkpoint)
    # DDP checkpoints prefix every name with "module."
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_matching_weights(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
    expected_missing: Callable[[str], bool] = lambda name: False,
) -> LoadReport:
    """Copy ``state_dict`` into ``module``, reporting every key that did not match.

    Keys for which ``ignore(name)`` is true (e.g. a classifier head the backbone does not keep)
    are dropped and logged at INFO, as are missing keys for which ``expected_missing(name)`` is
    true (layers that only exist in the detector); other missing or unexpected keys are logged
    as a WARNING listing them (they stay in the report either way). A shape mismatch is an
    error: it means the checkpoint is for another architecture.
    """
    report = LoadReport(ignored=[name for name in state_dict if ignore(name)])
    candidates = {name: tensor for name, tensor in state_dict.items() if not ignore(name)}
    diff = compare_state_dicts(module.state_dict(), candidates)
    if diff.mis_shaped:
        listing = "\n  ".join(diff.mis_shaped)
        raise CheckpointError(
            f"pretrained weights from '{source}' do not fit this backbone ({len(diff.mis_shaped)} shape "
            f"mismatches):\n  {listing}\nCheck that the checkpoint is for the configured architecture."
        )
    to_load = {name: candidates[name] for name in diff.fitting}
    report.unexpected, report.missing, report.loaded = diff.unexpected, diff.missing, diff.fitting
    # strict=False only because `missing` is reported above; every loaded name exists and fits.
    module.load_state_dict(to_load, strict=False)
    if report.ignored:
        log.info("pretrained weights from '%s': ignored %d keys not used by the backbone (%s)",
                 source, len(report.ignored), _summarise(report.ignored))
    fresh = [name for name in report.missing if expected_missing(name)]
    surprising = [name for name in report.missing if not expected_missing(name)]
    if fresh:
        log.info("pretrained weights from '%s': %d keys are new in the detector and keep their "
                 "initialisation (%s)", source, len(fresh), _summarise(fresh))
    if surprising:
        log.warning("pretrained weights from '%s': %d keys of the backbone are MISSING from the "
                    "checkpoint and keep their initialisation: %s",
                    source, len(surprising), _summarise(surprising))
    if report.unexpected:
        log.warning("pretrained weights from '%s': %d UNEXPECTED keys in the checkpoint were not "
                    "loaded: %s", source, len(report.unexpected), _summarise(report.unexpected))
    log.info("pretrained weights from '%s': loaded %d tensors", source, len(report.loaded))
    return report


def _summarise(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
