"""Contrastive denoising (CDN) queries, DINO style, as DAC-DETR builds them (docs/method.md,
Contrastive denoising)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dac_detr.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingQueries:
    """The DN part of one training batch.

    Layout: group k occupies slots [2kS, 2(k+1)S) with S = ``single_pad``; slot 2kS + j holds the
    positive (slightly noised) copy of GT j of that image and slot 2kS + S + j its negative (more
    noised) copy; slots past an image's own GT count are padding (zero content, box logit 0).
    """

    content: Tensor  # (B, pad_size, d): label embeddings of the (noised) labels
    box_logits: Tensor  # (B, pad_size, 4): inverse-sigmoid of the noised cxcywh boxes
    attn_mask: Tensor  # (pad_size + Q, pad_size + Q) bool, True = may not attend
    num_groups: int
    single_pad: int

    @property
    def pad_size(self) -> int:
        return 2 * self.single_pad * self.num_groups

    def meta(self) -> dict[str, int]:
        return {"num_groups": self.num_groups, "single_pad": self.single_pad, "pad_size": self.pad_size}


def build_cdn_queries(
    targets: list[dict[str, Tensor]],
    label_enc: nn.Embedding,
    num_classes: int,
    num_queries: int,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """Noised GT copies to prepend to the matching queries; None when the batch has no GT.

    ``dn_number`` is the budget of positive+negative pairs: with S the largest GT count of an
    image in the batch there are G = max(1, dn_number // S) groups of 2·S slots (the official 100
    gives G = 200 // 2S). That is at most 2·dn_number slots while S <= dn_number; an image with more
    than dn_number objects gives one group of 2·S > 2·dn_number slots. Label noise: each DN
    label is replaced, with probability ``label_noise_ratio / 2``, by a uniform class in
    [0, num_classes). Box noise: each xyxy corner moves by ±u·(w/2 or h/2)·``box_noise_scale``,
    u ~ U[0, 1) for positives and U[1, 2) for negatives, then the box is clamped to the image.
    ``generator`` drives all noise. The boxes and ``box_logits`` take the dtype of ``label_enc``'s
    weight, at least float32.
    """
    counts = [int(t["labels"].shape[0]) for t in targets]  # shapes: Python ints, no host sync
    single_pad = max(counts, default=0)
    if dn_number <= 0 or single_pad == 0:
        return None
    device = label_enc.weight.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the denoising generator is on '{generator.device}' but the model is on '{device}'; "
                         "create it with torch.Generator(device=images.device)")
    num_groups = max(1, dn_number // single_pad)
    pad_size = 2 * single_pad * num_groups
    # the boxes in the parameters' dtype, never below float32 (a float64 model keeps float64
    # DN box logits; under autocast the parameters, and so the boxes, stay float32)
    box_dtype = torch.promote_types(label_enc.weight.dtype, torch.float32)
    copies = _gt_copies(targets, counts, 2 * num_groups, single_pad, device, box_dtype)

    # label noise draws before box noise: the generator's stream fixes the order
    labels = copies.labels
    if label_noise_ratio > 0:
        labels = _noise_labels(labels, label_noise_ratio, num_classes, generator)
    boxes = copies.boxes
    if box_noise_scale > 0:
        boxes = _noise_boxes(boxes, copies.block % 2 == 1, box_noise_scale, generator)

    embed = label_enc(labels)
    where = (copies.image_idx, copies.slots)
    content = embed.new_zeros(len(targets), pad_size, embed.shape[-1]).index_put(where, embed)
    box_logits = boxes.new_zeros(len(targets), pad_size, 4).index_put(where, inverse_sigmoid(boxes))
    attn_mask = _dn_attention_mask(pad_size, 2 * single_pad, num_queries, device)
    return DenoisingQueries(content, box_logits, attn_mask, num_groups, single_pad)


@dataclass
class _GTCopies:
    """Every GT of the batch repeated once per DN block, flat: (copies·num_gt,) per field.

    Block-major like the official layout: block 2k holds the positives of group k, block 2k+1
    its negatives; within a block the GTs come image after image.
    """

    labels: Tensor  # int64 class of each copy
    boxes: Tensor  # (copies·num_gt, 4) clean cxcywh
    block: Tensor  # int64 block of each copy
    image_idx: Tensor  # int64 image of each copy
    slots: Tensor  # int64 DN slot of each copy in its image: block·single_pad + index of the GT


def _gt_copies(targets: list[dict[str, Tensor]], counts: list[int], copies: int, single_pad: int,
               device: torch.device, box_dtype: torch.dtype) -> _GTCopies:
    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=box_dtype)
    image_idx = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)])
    gt_idx = torch.cat([torch.arange(n, dtype=torch.long, device=device) for n in counts])
    num_gt = labels.shape[0]
    block = torch.arange(copies, device=device).repeat_interleave(num_gt)
    return _GTCopies(
        labels=labels.repeat(copies),
        boxes=boxes.repeat(copies, 1),
        block=block,
        image_idx=image_idx.repeat(copies),
        slots=block * single_pad + gt_idx.repeat(copies),
    )


def _noise_labels(labels: Tensor, label_noise_ratio: float, num_classes: int,
                  generator: torch.Generator | None) -> Tensor:
    """Each label replaced, with probability ``label_noise_ratio / 2``, by a uniform class."""
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < label_noise_ratio * 0.5
    random_labels = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, random_labels, labels)


def _noise_boxes(boxes: Tensor, negative: Tensor, box_noise_scale: float,
                 generator: torch.Generator | None) -> Tensor:
    """(M, 4) cxcywh, (M,) bool -> (M, 4) cxcywh with each xyxy corner moved by
    ±u·(w/2 or h/2)·``box_noise_scale``, u ~ U[0, 1) (positives) or U[1, 2) (negatives), clamped to
    the image."""
    xyxy = box_cxcywh_to_xyxy(boxes)
    half_wh = (boxes[:, 2:] / 2).repeat(1, 2)  # (w/2, h/2, w/2, h/2)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).float() * 2.0 - 1.0
    magnitude = torch.rand(boxes.shape, generator=generator, device=boxes.device)
    magnitude = magnitude + negative.float()[:, None]  # negatives: U[1, 2)
    xyxy = (xyxy + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(xyxy)


def _dn_attention_mask(pad_size: int, group_size: int, num_queries: int, device: torch.device) -> Tensor:
    """(pad_size + Q, pad_size + Q) bool, True = blocked; DN groups of ``group_size`` slots first.

    Matching queries never see DN slots (no GT leak); a DN group sees itself and the matching
    queries but no other group.
    """
    size = pad_size + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // group_size
    attn_mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return attn_mask
