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
    batch_size = len(targets)

    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
    # the boxes in the parameters' dtype, never below float32 (a float64 model keeps float64
    # DN box logits; under autocast the parameters, and so the boxes, stay float32)
    box_dtype = torch.promote_types(label_enc.weight.dtype, torch.float32)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=box_dtype)
    image_idx = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)])
    gt_idx = torch.cat([torch.arange(n, dtype=torch.long, device=device) for n in counts])
    num_gt = labels.shape[0]
    copies = 2 * num_groups  # block 2k = positives of group k, block 2k+1 = its negatives

    # (copies * num_gt,), block-major like the official layout
    labels = labels.repeat(copies)
    boxes = boxes.repeat(copies, 1)
    block = torch.arange(copies, device=device).repeat_interleave(num_gt)
    slots = block * single_pad + gt_idx.repeat(copies)
    image_idx = image_idx.repeat(copies)

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, generator=generator, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, labels.shape, generator=generator, device=device)
        labels = torch.where(flip, random_labels, labels)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        half_wh = (boxes[:, 2:] / 2).repeat(1, 2)  # (w/2, h/2, w/2, h/2)
        sign = torch.randint(0, 2, boxes.shape, generator=generator, device=device).float() * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, generator=generator, device=device)
        magnitude = magnitude + (block % 2 == 1).float()[:, None]  # negatives: U[1, 2)
        xyxy = (xyxy + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(xyxy)

    embed = label_enc(labels)
    content = embed.new_zeros(batch_size, pad_size, embed.shape[-1]).index_put((image_idx, slots), embed)
    box_logits = boxes.new_zeros(batch_size, pad_size, 4).index_put((image_idx, slots), inverse_sigmoid(boxes))

    # True = blocked. Matching queries never see DN slots (no GT leak); a DN group sees itself
    # and the matching queries but no other group.
    size = pad_size + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // (2 * single_pad)
    attn_mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return DenoisingQueries(content, box_logits, attn_mask, num_groups, single_pad)
