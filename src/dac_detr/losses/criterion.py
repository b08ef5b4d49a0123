"""All of DAC-DETR's training loss terms from one detector output dict (docs/method.md, "## Loss terms and weights").

Per decoder layer l, with N = the batch's GT count averaged over processes:

| branch      | queries            | assignment                  | normaliser                  |
|-------------|--------------------|-----------------------------|-----------------------------|
| ``o2o``     | O-stream matching  | Hungarian                   | max(N, 1)                   |
| ``o2m``     | C-stream matching  | one-to-many, rank-weighted  | max(N / o2m_loss_scale, 1)  |
| ``dn_o``    | O-stream DN slots  | fixed DN pairing            | max(N, 1) · G               |
| ``dn_c``    | C-stream DN slots  | fixed DN pairing            | max(N, 1) · G               |

plus ``enc`` (two-stage proposals over all encoder tokens, class-agnostic Hungarian, focal loss).
Each branch gives a classification, an L1 and a GIoU term; 4 branches x 6 layers x 3 + 3 = 75
terms in the official configuration.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from dac_detr.losses.assigner import OneToManyAssigner
from dac_detr.losses.functional import (
    box_giou_loss,
    box_l1_loss,
    check_duplicate_target,
    ia_bce_loss,
    iou_aware_quality,
    paired_box_iou,
    rank_weights,
    sigmoid_focal_loss,
)
from dac_detr.losses.matcher import HungarianMatcher
from dac_detr.losses.pairs import LayerPairs, PaddedTargets

DEFAULT_WEIGHTS = {"cls": 1.0, "l1": 5.0, "giou": 2.0, "enc_cls": 2.0, "enc_l1": 5.0, "enc_giou": 2.0}
CLS_LOSSES = ("ia_bce", "focal")
BOX_SOURCES = ("o_decoder", "c_decoder")


class SetCriterion(nn.Module):
    """DAC-DETR's criterion: ``criterion(outputs, targets, generator=None) -> dict``.

    The returned dict holds ``loss_*`` terms, already weighted, whose sum is the training loss
    (names in docs/interfaces.md: ``loss_{o2o,o2m,dn_o,dn_c}_{cls,l1,giou}_{l}``,
    ``loss_enc_{cls,l1,giou}``), and ``stat_*`` detached diagnostics: ``stat_o2o_iou_{l}`` (mean
    IoU of the Hungarian-matched O-stream pairs) and ``stat_o2m_pos_per_gt_{l}`` (one-to-many
    positives per GT, averaged over the batch's GTs); both are 0 for a batch without GT.
    Branches whose outputs are absent (no ``c_outputs``, ``enc_outputs`` or ``dn_outputs``)
    have no terms at all.

    Classification (``cls_loss``):
        ``"ia_bce"`` (official ``dac_cdn_ice``): IoU-aware BCE on every decoder branch. A
        positive's target is t = p^alpha·IoU^(1-alpha) (clamped >= ``ia_bce_min_quality``,
        detached), with p and IoU from the branch's own logits and boxes. In the one-to-many
        branch t is further multiplied by the rank weight exp(-r/``rank_tau``), r = the rank of t
        among the positives of the same GT, and the same weight multiplies that pair's L1 and
        GIoU terms. If one (query, class) entry is positive for two GTs of the same class (a
        query shared in the one-to-many assignment, docs/method.md "## Official quirks as options"), ``duplicate_target``
        picks its target; both pairs keep their box terms, as in the official code.
        ``"focal"`` (the ``dac_cdn`` variant): sigmoid focal loss with one-hot targets on every
        decoder branch, and no rank weights (all box weights 1).
        The encoder always uses the focal loss, class-agnostic (target one-hot on channel 0).

    Args:
        num_classes: width C of the classifier (from the data set; no hard-coded 91).
        matcher: the Hungarian matcher (O-stream layers and the encoder).
        assigner: the one-to-many assigner for ``c_outputs``; ``None`` when DAC is off.
        cls_loss: ``"ia_bce"`` or ``"focal"``.
        weights: loss weights; keys ``cls, l1, giou`` (every decoder branch) and ``enc_cls,
            enc_l1, enc_giou``; missing keys take the official 1, 5, 2, 2, 5, 2.
        o2m_box_source: boxes the assigner's IoU uses: ``"o_decoder"`` (official, docs/method.md
            "## Official quirks as options") or ``"c_decoder"``. The one-to-many losses always use the C-stream's boxes.
        o2m_loss_scale: the one-to-many normaliser is N / o2m_loss_scale (official 1/3, from
            ``balance_num = 3``).
        rank_tau: temperature of the rank weights (official 1.5).
        ia_bce_alpha, ia_bce_gamma, ia_bce_min_quality: IA-BCE's quality exponent (0.25),
            negative exponent (2) and target floor (0.01).
        focal_alpha, focal_gamma: focal loss alpha / gamma (0.25 / 2).
        duplicate_target: the IA-BCE target of an entry that is positive for several GTs:
            ``"last"`` (default, the official behaviour: the official ``pos_weights[idx] = t``
            lets the last write win, and the positives come per image, by GT ascending, within a
            GT by descending assignment score, so the later GT's target wins; resolved here by a
            stable sort, the same on every device) or ``"max"`` (the larger target). The focal
            loss ignores it (its targets are all 1).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        assigner: OneToManyAssigner | None = None,
        cls_loss: str = "ia_bce",
        weights: Mapping[str, float] | None = None,
        o2m_box_source: str = "o_decoder",
        o2m_loss_scale: float = 1 / 3,
        rank_tau: float = 1.5,
        ia_bce_alpha: float = 0.25,
        ia_bce_gamma: float = 2.0,
        ia_bce_min_quality: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        duplicate_target: str = "last",
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1; got {num_classes}")
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"SetCriterion: cls_loss must be one of {CLS_LOSSES}; got {cls_loss!r}")
        if o2m_box_source not in BOX_SOURCES:
            raise ValueError(f"SetCriterion: o2m_box_source must be one of {BOX_SOURCES}; got {o2m_box_source!r}")
        if not float(o2m_loss_scale) > 0:
            raise ValueError(f"SetCriterion: o2m_loss_scale must be > 0 (official 1/3); got {o2m_loss_scale}")
        if not float(rank_tau) > 0:
            raise ValueError(f"SetCriterion: rank_tau must be > 0 (official 1.5); got {rank_tau}")
        check_duplicate_target(duplicate_target, "SetCriterion")
        merged = dict(DEFAULT_WEIGHTS)
        for key, value in dict(weights or {}).items():
            if key not in DEFAULT_WEIGHTS:
                raise ValueError(f"SetCriterion: unknown loss weight {key!r}; the keys are {sorted(DEFAULT_WEIGHTS)}")
            merged[key] = float(value)
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.assigner = assigner
        self.cls_loss = cls_loss
        self.weights = merged
        self.o2m_box_source = o2m_box_source
        self.o2m_loss_scale = float(o2m_loss_scale)
        self.rank_tau = float(rank_tau)
        self.ia_bce_alpha = float(ia_bce_alpha)
        self.ia_bce_gamma = float(ia_bce_gamma)
        self.ia_bce_min_quality = float(ia_bce_min_quality)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.duplicate_target = duplicate_target

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, cls_loss={self.cls_loss!r}, weights={self.weights}, "
                f"o2m_box_source={self.o2m_box_source!r}, o2m_loss_scale={self.o2m_loss_scale:.4g}, "
                f"rank_tau={self.rank_tau}, duplicate_target={self.duplicate_target!r}")

    # ------------------------------------------------------------------------------------------
    def forward(self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]],
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute every loss term.

        The decoder layers of a branch are stacked and computed together: one matching cost,
        one one-to-many score tensor and one of each loss for all layers, split into the
        per-layer terms at the end (the Hungarian solve stays per layer and image, on the CPU).

        Args:
            outputs: the detector's output dict (docs/interfaces.md).
            targets: B dicts with ``labels`` (M_b,) int64 in [0, num_classes) and ``boxes``
                (M_b, 4) normalised cxcywh.
            generator: drives the random positive cap of the one-to-many assigner.
        Returns:
            ``{loss_*: weighted scalar, stat_*: detached scalar}``.
        """
        o_layers = self._o_layers(outputs)
        o_logits, o_boxes = _stacked(o_layers)
        device = o_logits.device
        targets = self._checked_targets(targets, o_layers[-1]["pred_boxes"], device)
        padded = PaddedTargets.from_targets(targets, targets[0]["boxes"].dtype if targets else torch.float32, device)
        mean_gt = self._mean_gt_over_processes(padded.num_gt, device)
        normaliser = mean_gt.clamp(min=1)
        terms: dict[str, Tensor] = {}

        pairs = self.matcher.match_layers(o_logits, o_boxes, padded)
        losses, iou = self._stacked_losses(o_logits, o_boxes, padded, pairs, normaliser, rank_weighted=False)
        pairs_per_layer = sum(min(o_logits.shape[2], n) for n in padded.sizes)
        iou_sum = iou.new_zeros(len(o_layers)).index_add(0, pairs.layer_idx, iou)
        mean_iou = iou_sum / pairs_per_layer if pairs_per_layer else iou_sum
        self._add_weighted(terms, "o2o", losses, stats={"stat_o2o_iou": mean_iou})

        c_layers = outputs.get("c_outputs") or []
        if c_layers:
            self._one_to_many_terms(terms, c_layers, o_boxes, padded, mean_gt, generator)

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs:
            self._denoising_terms(terms, dn_outputs, outputs.get("dn_meta"), padded, normaliser)

        enc = outputs.get("enc_outputs")
        if enc:
            self._encoder_terms(terms, enc, padded, normaliser)
        return terms

    # ------------------------------------------------------------------------------------------
    def _one_to_many_terms(self, terms: dict[str, Tensor], c_layers: list[dict[str, Tensor]], o_boxes: Tensor,
                           padded: PaddedTargets, mean_gt: Tensor, generator: torch.Generator | None) -> None:
        if self.assigner is None:
            raise ValueError("SetCriterion: the outputs have `c_outputs` (DAC on) but the criterion has no "
                             "assigner; build it with assigner=OneToManyAssigner(...) or turn DAC off")
        if len(c_layers) != o_boxes.shape[0]:
            raise ValueError(f"SetCriterion: {len(c_layers)} C-stream layers (`c_outputs`) but "
                             f"{o_boxes.shape[0]} O-stream layers (`aux_outputs` + last); they must match")
        for layer_idx, c_layer in enumerate(c_layers):
            c_logits, _ = self._checked_layer(c_layer, f"c_outputs[{layer_idx}]")
            if o_boxes.shape[1:3] != c_logits.shape[:2]:
                raise ValueError(f"SetCriterion: c_outputs[{layer_idx}] has {tuple(c_logits.shape[:2])} "
                                 f"(batch, queries) but the O-stream layer has {tuple(o_boxes.shape[1:3])}")
        c_logits, c_boxes = _stacked(c_layers)
        normaliser = (mean_gt / self.o2m_loss_scale).clamp(min=1)  # official: 3N from balance_num = 3
        source = o_boxes if self.o2m_box_source == "o_decoder" else c_boxes
        scores = self.assigner.scores(c_logits, source, padded.labels[None], padded.boxes[None])  # (L, B, M, Q)
        pairs = self.assigner.assign_layers(scores, padded.sizes, generator)
        losses, _ = self._stacked_losses(c_logits, c_boxes, padded, pairs, normaliser, rank_weighted=True)
        num_pos = torch.bincount(pairs.layer_idx, minlength=len(c_layers))
        # float64 division then float32, as a Python float turned into a tensor
        pos_per_gt = (num_pos.double() / max(padded.num_gt, 1)).to(torch.get_default_dtype())
        self._add_weighted(terms, "o2m", losses, stats={"stat_o2m_pos_per_gt": pos_per_gt})

    def _denoising_terms(self, terms: dict[str, Tensor], dn_outputs: Mapping[str, list],
                         dn_meta: Mapping[str, int] | None, padded: PaddedTargets, normaliser: Tensor) -> None:
        if not dn_meta:
            raise ValueError("SetCriterion: the outputs have `dn_outputs` but no `dn_meta` "
                             "({num_groups, single_pad, pad_size}); the detector must return both")
        num_groups, single_pad = int(dn_meta["num_groups"]), int(dn_meta["single_pad"])
        pad_size = 2 * single_pad * num_groups
        if int(dn_meta.get("pad_size", pad_size)) != pad_size:
            raise ValueError(f"SetCriterion: dn_meta is inconsistent: pad_size {dn_meta['pad_size']} != "
                             f"2 * single_pad {single_pad} * num_groups {num_groups}")
        streams = [(stream, list(dn_outputs.get(stream) or [])) for stream in ("o", "c")]
        for stream, layers in streams:
            for layer_idx, layer in enumerate(layers):
                logits, _ = self._checked_layer(layer, f"dn_outputs[{stream!r}][{layer_idx}]")
                if logits.shape[1] != pad_size:
                    raise ValueError(f"SetCriterion: dn_outputs[{stream!r}][{layer_idx}] has {logits.shape[1]} "
                                     f"slots but dn_meta says pad_size = {pad_size}")
        all_layers = [layer for _, layers in streams for layer in layers]
        if not all_layers:
            return
        logits, boxes = _stacked(all_layers)  # (L_o + L_c, B, pad_size, C): both streams at once
        pairs = self._denoising_pairs(padded.sizes, num_groups, single_pad, len(all_layers), logits.device)
        losses, _ = self._stacked_losses(logits, boxes, padded, pairs, normaliser * num_groups, rank_weighted=False)
        first = 0
        for stream, layers in streams:
            if layers:
                part = {name: value[first:first + len(layers)] for name, value in losses.items()}
                self._add_weighted(terms, f"dn_{stream}", part)
                first += len(layers)

    @staticmethod
    def _denoising_pairs(sizes: tuple[int, ...], num_groups: int, single_pad: int, num_layers: int,
                         device: torch.device) -> LayerPairs:
        """Fixed DN pairing: slot 2kS + j is the positive copy of GT j (k < G, j < n_b), in every layer.

        Built on the host from the GT counts (no device work per image), one transfer."""
        for b, n in enumerate(sizes):
            if n > single_pad:
                raise ValueError(f"SetCriterion: image {b} has {n} GTs but dn_meta single_pad is {single_pad}; "
                                 "the DN queries were built for other targets")
        per_image = [(np.full(n * num_groups, b), (np.arange(num_groups)[:, None] * 2 * single_pad
                                                    + np.arange(n)[None, :]).reshape(-1), np.tile(np.arange(n), num_groups))
                     for b, n in enumerate(sizes)]  # fmt: skip
        flat = torch.as_tensor(np.stack([np.concatenate(column) for column in zip(*per_image)]).astype(np.int64),
                               device=device) if per_image else torch.zeros(3, 0, dtype=torch.int64, device=device)
        return LayerPairs.repeated(flat[0], flat[1], flat[2], num_layers)

    def _encoder_terms(self, terms: dict[str, Tensor], enc: Mapping[str, Tensor], padded: PaddedTargets,
                       normaliser: Tensor) -> None:
        """Class-agnostic Hungarian over all encoder tokens; focal loss with class 0 as target."""
        logits, boxes = self._checked_layer(enc, "enc_outputs")
        agnostic = PaddedTargets(torch.zeros_like(padded.labels), padded.boxes, padded.valid, padded.sizes)
        pairs = self.matcher.match_layers(logits[None], boxes[None], agnostic)
        batch_idx, query_idx = pairs.batch_idx, pairs.query_idx
        channel0 = torch.zeros_like(query_idx)
        cls = sigmoid_focal_loss(logits, (batch_idx, query_idx, channel0), self.focal_alpha, self.focal_gamma)
        if len(pairs) == 0:
            # no pair: keep a zero-valued path to the boxes so DDP sees the box heads as used
            l1 = giou = boxes.sum() * 0
        else:
            src, gt_boxes = boxes[batch_idx, query_idx], padded.boxes[batch_idx, pairs.gt_idx]
            l1, giou = box_l1_loss(src, gt_boxes), box_giou_loss(src, gt_boxes)
        terms["loss_enc_cls"] = self.weights["enc_cls"] * cls / normaliser
        terms["loss_enc_l1"] = self.weights["enc_l1"] * l1 / normaliser
        terms["loss_enc_giou"] = self.weights["enc_giou"] * giou / normaliser

    # ------------------------------------------------------------------------------------------
    def _stacked_losses(self, logits: Tensor, boxes: Tensor, padded: PaddedTargets, pairs: LayerPairs,
                        normaliser: Tensor, rank_weighted: bool) -> tuple[dict[str, Tensor], Tensor]:
        """Classification, L1 and GIoU of L stacked layers of one branch, each divided by ``normaliser``.

        Args:
            logits: (L, B, Q, C); boxes: (L, B, Q, 4) cxcywh; pairs: the K pairs of all L layers.
            rank_weighted: the one-to-many branch (rank weights on targets and boxes).
        Returns:
            ({"cls", "l1", "giou"}: (L,) each, (K,) detached IoU of the K pairs).
        """
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: losses in float32
            logits, boxes = logits.float(), boxes.float()
        num_layers = logits.shape[0]
        layer_idx, batch_idx, query_idx = pairs.layer_idx, pairs.batch_idx, pairs.query_idx
        labels = padded.labels[batch_idx, pairs.gt_idx]
        gt_boxes = padded.boxes[batch_idx, pairs.gt_idx]
        src = boxes[layer_idx, batch_idx, query_idx]
        with torch.no_grad():
            iou = paired_box_iou(src.detach(), gt_boxes)
        box_weights = None
        index = (layer_idx, batch_idx, query_idx, labels)
        if self.cls_loss == "ia_bce":
            with torch.no_grad():
                prob = logits[index].detach().sigmoid()
                quality = iou_aware_quality(prob, iou, self.ia_bce_alpha, self.ia_bce_min_quality)
                if rank_weighted:
                    # one group per (layer, image, GT)
                    groups = (layer_idx * padded.labels.shape[0] + batch_idx) * padded.max_gt + pairs.gt_idx
                    box_weights = rank_weights(groups, quality, self.rank_tau)
                    quality = quality * box_weights
            cls = ia_bce_loss(logits, index, quality, self.ia_bce_gamma, self.duplicate_target, per_layer=True)
        else:
            cls = sigmoid_focal_loss(logits, index, self.focal_alpha, self.focal_gamma, per_layer=True)
        if len(pairs) == 0:
            # no pair: keep a zero-valued path to the boxes so DDP sees the box heads as used
            l1 = giou = boxes.flatten(1).sum(1) * 0
        else:
            l1 = box_l1_loss(src, gt_boxes, box_weights, layer_idx, num_layers)
            giou = box_giou_loss(src, gt_boxes, box_weights, layer_idx, num_layers)
        return {"cls": cls / normaliser, "l1": l1 / normaliser, "giou": giou / normaliser}, iou

    def _add_weighted(self, terms: dict[str, Tensor], branch: str, losses: Mapping[str, Tensor],
                      stats: Mapping[str, Tensor] | None = None) -> None:
        """Per-layer terms ``loss_{branch}_{name}_{l}`` (weighted) and ``{stat}_{l}`` from (L,) tensors."""
        per_layer = {name: (self.weights[name] * value).unbind() for name, value in losses.items()}
        stat_values = {name: value.detach().unbind() for name, value in (stats or {}).items()}
        num_layers = len(next(iter(per_layer.values())))
        for layer_idx in range(num_layers):
            for name, values in per_layer.items():
                terms[f"loss_{branch}_{name}_{layer_idx}"] = values[layer_idx]
            for name, values in stat_values.items():
                terms[f"{name}_{layer_idx}"] = values[layer_idx]

    @staticmethod
    def _mean_gt_over_processes(num_gt: int, device: torch.device) -> Tensor:
        """N: the GT count summed over all processes / world size (before the >= 1 clamp)."""
        count = torch.tensor(float(num_gt), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return count

    # ------------------------------------------------------------------------------------------
    def _checked_layer(self, layer: Mapping[str, Tensor], where: str) -> tuple[Tensor, Tensor]:
        if not isinstance(layer, Mapping) or "pred_logits" not in layer or "pred_boxes" not in layer:
            raise ValueError(f"SetCriterion: {where} must be a dict with `pred_logits` and `pred_boxes`")
        logits, boxes = layer["pred_logits"], layer["pred_boxes"]
        if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(f"SetCriterion: {where} needs pred_logits (B, Q, C) and pred_boxes (B, Q, 4); "
                             f"got {tuple(logits.shape)} and {tuple(boxes.shape)}")
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion: {where}.pred_logits has {logits.shape[-1]} classes but the "
                             f"criterion was built with num_classes={self.num_classes}; pass the data set's "
                             "num_classes to both the detector and the criterion")
        return logits, boxes

    def _o_layers(self, outputs: Mapping[str, Any]) -> list[dict[str, Tensor]]:
        """The O-stream layers 0..Ld-1: ``aux_outputs`` then the last layer."""
        if not isinstance(outputs, Mapping) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise ValueError("SetCriterion: `outputs` must be the detector's output dict with at least "
                             "`pred_logits` and `pred_boxes` (docs/interfaces.md)")
        layers = list(outputs.get("aux_outputs") or []) + [
            {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
        for layer_idx, layer in enumerate(layers):
            self._checked_layer(layer, f"O-stream layer {layer_idx}")
        return layers

    def _checked_targets(self, targets: list[dict[str, Tensor]], pred_boxes: Tensor,
                         device: torch.device) -> list[dict[str, Tensor]]:
        """Targets on the outputs' device, boxes in the predictions' dtype (float32 at least)."""
        batch_size = pred_boxes.shape[0]
        box_dtype = torch.float64 if pred_boxes.dtype == torch.float64 else torch.float32
        if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
            raise ValueError(f"SetCriterion: `targets` must be a list of {batch_size} dicts (one per image "
                             f"of the outputs); got {type(targets).__name__} of length {len(targets)}")
        checked = []
        for b, t in enumerate(targets):
            if "labels" not in t or "boxes" not in t:
                raise ValueError(f"SetCriterion: target {b} needs `labels` (N,) and `boxes` (N, 4); "
                                 f"it has {sorted(t)}")
            labels = torch.as_tensor(t["labels"], device=device).long()
            boxes = torch.as_tensor(t["boxes"], device=device).to(box_dtype)
            if labels.dim() != 1 or boxes.dim() != 2 or boxes.shape != (labels.shape[0], 4):
                raise ValueError(f"SetCriterion: target {b} has labels {tuple(labels.shape)} and boxes "
                                 f"{tuple(boxes.shape)}; expected (N,) and (N, 4)")
            checked.append({"labels": labels, "boxes": boxes})
        all_labels = torch.cat([t["labels"] for t in checked])
        if all_labels.numel():
            low, high = torch.stack([all_labels.min(), all_labels.max()]).tolist()  # one device sync
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"SetCriterion: target labels must lie in [0, {self.num_classes}); got the "
                                 f"range [{low}, {high}]; check num_classes and the data set's label mapping")
        return checked


def _stacked(layers: list[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """L layer dicts -> logits (L, B, Q, C) and boxes (L, B, Q, 4) (one copy; gradients flow back)."""
    return (torch.stack([layer["pred_logits"] for layer in layers]),
            torch.stack([layer["pred_boxes"] for layer in layers]))
