"""All of DAC-DETR's training loss terms from one detector output dict (SPEC part 2, §2.3, §4).

Per decoder layer l (SPEC §2.3), with N = the batch's GT count averaged over processes:

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

import torch
from torch import Tensor, nn

from dac_detr.losses.assigner import OneToManyAssigner
from dac_detr.losses.functional import (
    box_giou_loss,
    box_l1_loss,
    ia_bce_loss,
    iou_aware_quality,
    DUPLICATE_TARGETS,
    paired_box_iou,
    rank_weights,
    sigmoid_focal_loss,
)
from dac_detr.losses.matcher import HungarianMatcher

DEFAULT_WEIGHTS = {"cls": 1.0, "l1": 5.0, "giou": 2.0, "enc_cls": 2.0, "enc_l1": 5.0, "enc_giou": 2.0}
CLS_LOSSES = ("ia_bce", "focal")
BOX_SOURCES = ("o_decoder", "c_decoder")

Pairs = list[tuple[Tensor, Tensor]]  # per image: (query_idx, gt_idx)


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
        query shared in the one-to-many assignment, SPEC §7 item 3), ``duplicate_target``
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
        o2m_box_source: boxes the assigner's IoU uses: ``"o_decoder"`` (official, SPEC §7
            item 1) or ``"c_decoder"``. The one-to-many losses always use the C-stream's boxes.
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
        if duplicate_target not in DUPLICATE_TARGETS:
            raise ValueError(f"SetCriterion: duplicate_target must be one of {DUPLICATE_TARGETS} "
                             f"(official 'last'); got {duplicate_target!r}")
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

        Args:
            outputs: the detector's output dict (docs/interfaces.md).
            targets: B dicts with ``labels`` (M_b,) int64 in [0, num_classes) and ``boxes``
                (M_b, 4) normalised cxcywh.
            generator: drives the random positive cap of the one-to-many assigner.
        Returns:
            ``{loss_*: weighted scalar, stat_*: detached scalar}``.
        """
        o_layers = self._o_layers(outputs)
        device = o_layers[-1]["pred_logits"].device
        targets = self._checked_targets(targets, o_layers[-1]["pred_boxes"], device)
        mean_gt = self._mean_gt_over_processes(sum(int(t["labels"].shape[0]) for t in targets), device)
        normaliser = mean_gt.clamp(min=1)
        terms: dict[str, Tensor] = {}

        for layer_idx, layer in enumerate(o_layers):
            pairs = self.matcher(layer["pred_logits"], layer["pred_boxes"], targets)
            losses, iou = self._pair_losses(layer["pred_logits"], layer["pred_boxes"], targets, pairs,
                                            normaliser, rank_weighted=False)
            self._add_weighted(terms, "o2o", layer_idx, losses)
            terms[f"stat_o2o_iou_{layer_idx}"] = iou.mean() if iou.numel() else iou.new_zeros(())

        c_layers = outputs.get("c_outputs") or []
        if c_layers:
            self._one_to_many_terms(terms, c_layers, o_layers, targets, mean_gt, generator)

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs:
            self._denoising_terms(terms, dn_outputs, outputs.get("dn_meta"), targets, normaliser)

        enc = outputs.get("enc_outputs")
        if enc:
            self._encoder_terms(terms, enc, targets, normaliser)
        return terms

    # ------------------------------------------------------------------------------------------
    def _one_to_many_terms(self, terms: dict[str, Tensor], c_layers: list[dict[str, Tensor]],
                           o_layers: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
                           mean_gt: Tensor, generator: torch.Generator | None) -> None:
        if self.assigner is None:
            raise ValueError("SetCriterion: the outputs have `c_outputs` (DAC on) but the criterion has no "
                             "assigner; build it with assigner=OneToManyAssigner(...) or turn DAC off")
        if len(c_layers) != len(o_layers):
            raise ValueError(f"SetCriterion: {len(c_layers)} C-stream layers (`c_outputs`) but "
                             f"{len(o_layers)} O-stream layers (`aux_outputs` + last); they must match")
        normaliser = (mean_gt / self.o2m_loss_scale).clamp(min=1)  # official: 3N from balance_num = 3
        num_gt = sum(int(t["labels"].shape[0]) for t in targets)
        for layer_idx, (c_layer, o_layer) in enumerate(zip(c_layers, o_layers)):
            c_logits, c_boxes = self._checked_layer(c_layer, f"c_outputs[{layer_idx}]")
            source = o_layer["pred_boxes"] if self.o2m_box_source == "o_decoder" else c_boxes
            if source.shape[:2] != c_logits.shape[:2]:
                raise ValueError(f"SetCriterion: c_outputs[{layer_idx}] has {tuple(c_logits.shape[:2])} "
                                 f"(batch, queries) but the O-stream layer has {tuple(source.shape[:2])}")
            pairs = [
                self.assigner(c_logits[b], source[b], t["labels"], t["boxes"], generator=generator)
                for b, t in enumerate(targets)
            ]
            losses, _ = self._pair_losses(c_logits, c_boxes, targets, pairs, normaliser, rank_weighted=True)
            self._add_weighted(terms, "o2m", layer_idx, losses)
            num_pos = sum(int(q.numel()) for q, _ in pairs)
            terms[f"stat_o2m_pos_per_gt_{layer_idx}"] = torch.tensor(num_pos / max(num_gt, 1), device=c_logits.device)

    def _denoising_terms(self, terms: dict[str, Tensor], dn_outputs: Mapping[str, list],
                         dn_meta: Mapping[str, int] | None, targets: list[dict[str, Tensor]],
                         normaliser: Tensor) -> None:
        if not dn_meta:
            raise ValueError("SetCriterion: the outputs have `dn_outputs` but no `dn_meta` "
                             "({num_groups, single_pad, pad_size}); the detector must return both")
        num_groups, single_pad = int(dn_meta["num_groups"]), int(dn_meta["single_pad"])
        pad_size = 2 * single_pad * num_groups
        if int(dn_meta.get("pad_size", pad_size)) != pad_size:
            raise ValueError(f"SetCriterion: dn_meta is inconsistent: pad_size {dn_meta['pad_size']} != "
                             f"2 * single_pad {single_pad} * num_groups {num_groups}")
        device = normaliser.device
        pairs = self._denoising_pairs(targets, num_groups, single_pad, device)
        for stream in ("o", "c"):
            for layer_idx, layer in enumerate(dn_outputs.get(stream) or []):
                logits, boxes = self._checked_layer(layer, f"dn_outputs[{stream!r}][{layer_idx}]")
                if logits.shape[1] != pad_size:
                    raise ValueError(f"SetCriterion: dn_outputs[{stream!r}][{layer_idx}] has {logits.shape[1]} "
                                     f"slots but dn_meta says pad_size = {pad_size}")
                losses, _ = self._pair_losses(logits, boxes, targets, pairs, normaliser * num_groups,
                                              rank_weighted=False)
                self._add_weighted(terms, f"dn_{stream}", layer_idx, losses)

    @staticmethod
    def _denoising_pairs(targets: list[dict[str, Tensor]], num_groups: int, single_pad: int,
                         device: torch.device) -> Pairs:
        """Fixed DN pairing: slot 2kS + j is the positive copy of GT j (k < G, j < n_b)."""
        pairs = []
        for b, t in enumerate(targets):
            n = int(t["labels"].shape[0])
            if n > single_pad:
                raise ValueError(f"SetCriterion: image {b} has {n} GTs but dn_meta single_pad is {single_pad}; "
                                 "the DN queries were built for other targets")
            gt = torch.arange(n, device=device)
            slots = (torch.arange(num_groups, device=device) * 2 * single_pad)[:, None] + gt[None, :]
            pairs.append((slots.flatten(), gt.repeat(num_groups)))
        return pairs

    def _encoder_terms(self, terms: dict[str, Tensor], enc: Mapping[str, Tensor],
                       targets: list[dict[str, Tensor]], normaliser: Tensor) -> None:
        """Class-agnostic Hungarian over all encoder tokens; focal loss with class 0 as target."""
        logits, boxes = self._checked_layer(enc, "enc_outputs")
        agnostic = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
        pairs = self.matcher(logits, boxes, agnostic)
        batch_idx, query_idx, gt_idx = self._flatten_pairs(pairs)
        channel0 = torch.zeros_like(query_idx)
        cls = sigmoid_focal_loss(logits, (batch_idx, query_idx, channel0), self.focal_alpha, self.focal_gamma)
        l1, giou = self._box_terms(boxes, batch_idx, query_idx, self._gather_gt_boxes(targets, pairs), None)
        terms["loss_enc_cls"] = self.weights["enc_cls"] * cls / normaliser
        terms["loss_enc_l1"] = self.weights["enc_l1"] * l1 / normaliser
        terms["loss_enc_giou"] = self.weights["enc_giou"] * giou / normaliser

    # ------------------------------------------------------------------------------------------
    def _pair_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], pairs: Pairs,
                     normaliser: Tensor, rank_weighted: bool) -> tuple[dict[str, Tensor], Tensor]:
        """Classification, L1 and GIoU of one branch and layer, each divided by ``normaliser``.

        Args:
            logits: (B, Q, C); boxes: (B, Q, 4) cxcywh; pairs: per image (query_idx, gt_idx).
            rank_weighted: the one-to-many branch (rank weights on targets and boxes).
        Returns:
            ({"cls", "l1", "giou"} scalars, (K,) detached IoU of the K pairs).
        """
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: losses in float32
            logits, boxes = logits.float(), boxes.float()
        batch_idx, query_idx, gt_idx = self._flatten_pairs(pairs)
        labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, pairs)])
        gt_boxes = self._gather_gt_boxes(targets, pairs)
        with torch.no_grad():
            iou = paired_box_iou(boxes[batch_idx, query_idx].detach(), gt_boxes)
        box_weights = None
        if self.cls_loss == "ia_bce":
            with torch.no_grad():
                prob = logits[batch_idx, query_idx, labels].detach().sigmoid()
                quality = iou_aware_quality(prob, iou, self.ia_bce_alpha, self.ia_bce_min_quality)
                if rank_weighted:
                    # one group per (image, GT): offset each image's GT ids by the GTs before it
                    offsets = torch.tensor([0] + [int(t["labels"].shape[0]) for t in targets[:-1]],
                                           device=logits.device).cumsum(0)
                    box_weights = rank_weights(offsets[batch_idx] + gt_idx, quality, self.rank_tau)
                    quality = quality * box_weights
            cls = ia_bce_loss(logits, (batch_idx, query_idx, labels), quality, self.ia_bce_gamma,
                              self.duplicate_target)
        else:
            cls = sigmoid_focal_loss(logits, (batch_idx, query_idx, labels), self.focal_alpha, self.focal_gamma)
        l1, giou = self._box_terms(boxes, batch_idx, query_idx, gt_boxes, box_weights)
        return {"cls": cls / normaliser, "l1": l1 / normaliser, "giou": giou / normaliser}, iou

    @staticmethod
    def _box_terms(boxes: Tensor, batch_idx: Tensor, query_idx: Tensor, gt_boxes: Tensor,
                   weights: Tensor | None) -> tuple[Tensor, Tensor]:
        if batch_idx.numel() == 0:
            # no pair: keep a zero-valued path to the boxes so DDP sees the box heads as used
            zero = boxes.sum() * 0
            return zero, zero
        src = boxes[batch_idx, query_idx]
        return box_l1_loss(src, gt_boxes, weights), box_giou_loss(src, gt_boxes, weights)

    @staticmethod
    def _flatten_pairs(pairs: Pairs) -> tuple[Tensor, Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(pairs)])
        return batch_idx, torch.cat([q for q, _ in pairs]), torch.cat([g for _, g in pairs])

    @staticmethod
    def _gather_gt_boxes(targets: list[dict[str, Tensor]], pairs: Pairs) -> Tensor:
        return torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, pairs)])

    def _add_weighted(self, terms: dict[str, Tensor], branch: str, layer_idx: int,
                      losses: Mapping[str, Tensor]) -> None:
        for name, value in losses.items():
            terms[f"loss_{branch}_{name}_{layer_idx}"] = self.weights[name] * value

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
