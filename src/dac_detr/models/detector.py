"""DAC-DETR: Deformable-DETR++ with contrastive denoising and the DAC dual decoder.

The forward returns the dict of docs/interfaces.md. In training with ``dac_enabled`` every
decoder layer also runs the C-stream (cross-attention + FFN, no self-attention, same weights);
at eval only the O-stream runs, so the trained model costs nothing extra at inference.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone_common import resize_padding_mask
from .denoising import DenoisingQueries, build_cdn_queries
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableTransformer

GROUP_NORM_GROUPS = 32  # GroupNorm(32, d) after every input projection (official)


class MLP(nn.Module):
    """Linear layers with ReLU in between (the box head: d -> d -> d -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DACDETR(nn.Module):
    """The detector. Every switch is a plain argument; all combinations run.

    Args:
        backbone: module with ``forward(images, pixel_mask) -> [(feature (B, C_i, h_i, w_i),
            mask (B, h_i, w_i))]`` (strides 8/16/32) and ``num_channels``.
        num_classes: classifier width (from the datamodule); also sizes the DN label book.
        num_feature_levels: levels fed to the transformer. Fewer than the backbone maps uses the
            coarsest ones; more adds stride-2 3x3 convs, the first on the raw last map.
        num_queries: matching queries (two-stage: proposals selected from the encoder).
        two_stage / with_box_refine / mixed_selection / look_forward_twice: Deformable-DETR++
            switches (docs/method.md, Two-stage proposals to Decoder). ``mixed_selection`` only
            matters with two-stage and ``look_forward_twice`` only with box refinement.
        dn_number: CDN budget: 2·S·max(1, dn_number // S) DN slots for S = the most GTs of an image
            in the batch (at most 2·max(dn_number, S)); 0 switches denoising off.
        dac_enabled: run the C-stream in training; False gives the baseline with the same code.
        share_layer0_self_attn: the C-stream starts from the O-stream's layer-0 post-self-attention
            tensor (official); False starts it from the raw queries.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        hidden_dim: int = 256,
        nheads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        num_queries: int = 900,
        two_stage: bool = True,
        with_box_refine: bool = True,
        mixed_selection: bool = True,
        look_forward_twice: bool = True,
        dn_number: int = 100,
        dn_box_noise_scale: float = 0.4,
        dn_label_noise_ratio: float = 0.5,
        dac_enabled: bool = True,
        share_layer0_self_attn: bool = True,
    ):
        super().__init__()
        _check_config(backbone, num_classes, hidden_dim, nheads, num_encoder_layers, num_decoder_layers,
                      num_feature_levels, num_queries, dn_number)
        self.backbone = backbone
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.num_decoder_layers = num_decoder_layers
        self.two_stage = two_stage
        self.with_box_refine = with_box_refine
        self.mixed_selection = mixed_selection
        self.look_forward_twice = look_forward_twice
        self.dn_number = dn_number
        self.dn_box_noise_scale = dn_box_noise_scale
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dac_enabled = dac_enabled
        self.share_layer0_self_attn = share_layer0_self_attn

        self.transformer = DeformableTransformer(
            d_model=hidden_dim, nhead=nheads, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            num_feature_levels=num_feature_levels, enc_n_points=enc_n_points, dec_n_points=dec_n_points,
            two_stage=two_stage, mixed_selection=mixed_selection, embed_dn_boxes=dn_number > 0,
        )
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        self.input_proj, self.num_backbone_levels = _input_projections(
            list(backbone.num_channels), hidden_dim, num_feature_levels)
        # after the projections, before the heads: the module order fixes what each init draws from the global RNG
        self._build_embedding_tables()
        self.class_embed, self.bbox_embed = _prediction_heads(
            hidden_dim, num_classes, num_decoder_layers, two_stage, with_box_refine)

    def _build_embedding_tables(self) -> None:
        """The learned query table (``query_embed``: (Q, 2d) positional and content queries without
        two-stage, (Q, d) content queries with mixed selection, none otherwise) and, with
        denoising, the DN label book ``label_enc``."""
        if not self.two_stage:
            self.query_embed = nn.Embedding(self.num_queries, 2 * self.hidden_dim)  # (positional, content)
        elif self.mixed_selection:
            self.query_embed = nn.Embedding(self.num_queries, self.hidden_dim)  # content only
        if self.dn_number > 0:
            # one extra row, as DN-DETR's "unknown" label; the noise only draws [0, num_classes)
            self.label_enc = nn.Embedding(self.num_classes + 1, self.hidden_dim)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        pixel_mask: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """images (B, 3, H, W), pixel_mask (B, H, W) bool True on padding; targets (training with
        denoising): per image ``labels`` (N,) int64 and ``boxes`` (N, 4) normalised cxcywh.
        Returns the output dict of docs/interfaces.md."""
        _check_inputs(images, pixel_mask)
        batch_size = images.shape[0]
        srcs, masks, pos_embeds = self._multiscale_features(images, pixel_mask)
        src_flat, pos_flat, levels = self.transformer.flatten(srcs, masks, pos_embeds)
        memory = self.transformer.encoder(src_flat, pos_flat, levels)

        dn = self._denoising_queries(targets, batch_size, generator) if self.training else None
        out: dict = {}
        topk_box_logits = None
        if self.two_stage:
            topk_box_logits, out["enc_outputs"] = self._select_proposals(memory, levels)
        query_embed = self.query_embed.weight if hasattr(self, "query_embed") else None
        tgt, query_pos, reference = self.transformer.initial_queries(
            batch_size, query_embed, topk_box_logits,
            dn.content if dn is not None else None, dn.box_logits if dn is not None else None)

        run_c_stream = self.training and self.dac_enabled
        dec = self.transformer.decoder(
            tgt, query_pos, reference, memory, levels, self.bbox_embed,
            attn_mask=dn.attn_mask if dn is not None else None,
            box_refine=self.with_box_refine, look_forward_twice=self.look_forward_twice,
            run_c_stream=run_c_stream, share_layer0_self_attn=self.share_layer0_self_attn,
        )
        o_hidden = list(dec.o_hidden)
        if self.training:
            o_hidden[0] = o_hidden[0] + self._ddp_anchor()
        o_layers = self._predict(o_hidden, dec.o_boxes)
        pad = dn.pad_size if dn is not None else 0
        o_match = [_slice(layer, pad, None) for layer in o_layers]
        out["pred_logits"] = o_match[-1]["pred_logits"]
        out["pred_boxes"] = o_match[-1]["pred_boxes"]
        out["aux_outputs"] = o_match[:-1]
        c_layers = self._predict(dec.c_hidden, dec.c_boxes) if run_c_stream else None
        if c_layers is not None:
            out["c_outputs"] = [_slice(layer, pad, None) for layer in c_layers]
        if dn is not None:
            out["dn_outputs"] = {"o": [_slice(layer, 0, pad) for layer in o_layers]}
            if c_layers is not None:
                out["dn_outputs"]["c"] = [_slice(layer, 0, pad) for layer in c_layers]
            out["dn_meta"] = dn.meta()
        return out

    # ------------------------------------------------------------------------------------------
    def _denoising_queries(self, targets: list[dict[str, Tensor]] | None, batch_size: int,
                           generator: torch.Generator | None) -> DenoisingQueries | None:
        """The CDN queries of a training batch; None with denoising off or no GT in the batch."""
        if self.dn_number <= 0:
            return None
        if targets is None:
            raise ValueError("training with denoising (dn_number > 0) needs `targets`; "
                             "pass the batch targets or build the model with dn_number=0")
        _check_targets(targets, batch_size, self.num_classes)
        return build_cdn_queries(targets, self.label_enc, self.num_classes, self.num_queries, self.dn_number,
                                 self.dn_label_noise_ratio, self.dn_box_noise_scale, generator)

    def _multiscale_features(self, images: Tensor, pixel_mask: Tensor
                             ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected maps (B, d, h_l, w_l), their padding masks and sine positions, L levels."""
        features = self.backbone(images, pixel_mask)
        if len(features) != len(self.backbone.num_channels):
            raise ValueError(f"the backbone returned {len(features)} maps but declares "
                             f"{len(self.backbone.num_channels)} in num_channels")
        features = features[len(features) - self.num_backbone_levels:]
        srcs, masks, pos_embeds = [], [], []
        for lvl, (feature, mask) in enumerate(features):
            srcs.append(self.input_proj[lvl](feature))
            masks.append(mask)
            pos_embeds.append(self.position_embedding(mask).to(feature.dtype))
        for lvl in range(self.num_backbone_levels, self.num_feature_levels):
            # the first extra level comes from the RAW last backbone map, later ones from the
            # previous extra level (docs/method.md, Input levels and positional encodings)
            src = self.input_proj[lvl](features[-1][0] if lvl == self.num_backbone_levels else srcs[-1])
            mask = resize_padding_mask(pixel_mask, src.shape[-2:])  # = F.interpolate nearest, exportable
            srcs.append(src)
            masks.append(mask)
            pos_embeds.append(self.position_embedding(mask).to(src.dtype))
        return srcs, masks, pos_embeds

    def _select_proposals(self, memory: Tensor, levels) -> tuple[Tensor, dict[str, Tensor]]:
        """Two-stage: encoder predictions on every token, and the detached box logits (B, Q, 4)
        of the Q tokens with the highest class-0 (class-agnostic) logit."""
        output_memory, proposals = self.transformer.encoder_proposals(memory, levels)
        enc_logits = self.class_embed[self.num_decoder_layers](output_memory)
        enc_box_logits = self.bbox_embed[self.num_decoder_layers](output_memory) + proposals
        num_tokens = enc_logits.shape[1]
        if num_tokens < self.num_queries:
            raise ValueError(
                f"two-stage selects num_queries={self.num_queries} encoder proposals but the images give only "
                f"{num_tokens} encoder tokens over {self.num_feature_levels} levels; use larger images or "
                f"fewer queries (model.num_queries)")
        topk = torch.topk(enc_logits[..., 0], self.num_queries, dim=1).indices
        topk_box_logits = torch.gather(enc_box_logits, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
        return topk_box_logits, {"pred_logits": enc_logits, "pred_boxes": enc_box_logits.sigmoid()}

    def _predict(self, hidden: list[Tensor], boxes: list[Tensor]) -> list[dict[str, Tensor]]:
        return [{"pred_logits": self.class_embed[lid](h), "pred_boxes": b}
                for lid, (h, b) in enumerate(zip(hidden, boxes))]

    def _ddp_anchor(self) -> Tensor:
        """A zero that depends on every parameter some training batches do not use.

        DDP without the unused-parameter search (``trainer=ddp``) fails when a parameter gets no
        gradient: the label book is unused by a batch without GT (no DN queries), and so are
        ``pos_trans`` / ``pos_trans_norm`` (weights and biases) when only the DN queries need them
        (no two-stage). Adding 0·(one entry of each) to the layer-0 output gives them an exact zero
        gradient every step (the official adds label_enc.weight[0, 0] * 0). Every other parameter
        reaches the loss even when no image of the batch has an object
        (tests/test_ddp.py checks both with 2 processes).
        """
        modules: list[nn.Module] = []
        if self.dn_number > 0:
            modules.append(self.label_enc)
            if not self.two_stage:
                modules += [self.transformer.pos_trans, self.transformer.pos_trans_norm]
        anchor = self.class_embed[0].bias.new_zeros(())
        for module in modules:
            for p in module.parameters():
                anchor = anchor + p.view(-1)[0] * 0.0
        return anchor


def _slice(layer: dict[str, Tensor], start: int, stop: int | None) -> dict[str, Tensor]:
    return {k: v[:, start:stop] for k, v in layer.items()}


def _input_projections(num_channels: list[int], hidden_dim: int, num_feature_levels: int
                       ) -> tuple[nn.ModuleList, int]:
    """1x1 conv + GN per used backbone map, then stride-2 3x3 conv + GN per extra level."""
    used = min(num_feature_levels, len(num_channels))
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim))
                   for c in num_channels[len(num_channels) - used:]]
    in_channels = num_channels[-1]
    for _ in range(num_feature_levels - used):
        projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim)))
        in_channels = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projections), used


def _prediction_heads(hidden_dim: int, num_classes: int, num_decoder_layers: int, two_stage: bool,
                      with_box_refine: bool) -> tuple[nn.ModuleList, nn.ModuleList]:
    """One class/box head per decoder layer (+1 for the two-stage encoder), official init.

    With box refinement the heads are independent copies of one initialised head; without, all
    entries are the same module (Deformable DETR). Class bias = -log((1-0.01)/0.01) (prior 0.01);
    the last box layer is zero, with bias[2:] = -2 (small initial w, h relative to a point) except
    in two-stage, where references are boxes and bias[2:] = 0 on every copy.
    """
    class_head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.constant_(box_head.layers[-1].weight, 0)
    nn.init.constant_(box_head.layers[-1].bias, 0)
    num_pred = num_decoder_layers + 1 if two_stage else num_decoder_layers
    if with_box_refine:
        class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_pred))
        box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_pred))
        nn.init.constant_(box_heads[0].layers[-1].bias[2:], -2.0)
    else:
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        class_heads = nn.ModuleList(class_head for _ in range(num_pred))
        box_heads = nn.ModuleList(box_head for _ in range(num_pred))
    if two_stage:
        for head in box_heads:
            nn.init.constant_(head.layers[-1].bias[2:], 0.0)
    return class_heads, box_heads


def _check_config(backbone, num_classes, hidden_dim, nheads, num_encoder_layers, num_decoder_layers,
                  num_feature_levels, num_queries, dn_number) -> None:
    if not hasattr(backbone, "num_channels"):
        raise TypeError(f"the backbone ({type(backbone).__name__}) must expose `num_channels` (channels of each "
                        "returned map), e.g. dac_detr.models.ResNetBackbone")
    checks = [
        (num_classes >= 1, f"num_classes must be >= 1, got {num_classes} (take it from the datamodule)"),
        (hidden_dim % GROUP_NORM_GROUPS == 0,
         f"hidden_dim must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups), got {hidden_dim}"),
        (hidden_dim % nheads == 0, f"hidden_dim ({hidden_dim}) must be divisible by nheads ({nheads})"),
        (num_encoder_layers >= 1 and num_decoder_layers >= 1,
         f"need >= 1 encoder and decoder layer, got {num_encoder_layers} and {num_decoder_layers}"),
        (num_feature_levels >= 1, f"num_feature_levels must be >= 1, got {num_feature_levels}"),
        (num_queries >= 1, f"num_queries must be >= 1, got {num_queries}"),
        (dn_number >= 0, f"dn_number must be >= 0 (0 switches denoising off), got {dn_number}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _check_inputs(images: Tensor, pixel_mask: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if pixel_mask.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"pixel_mask must be (B, H, W) = {(images.shape[0], *images.shape[2:])} to match the "
                         f"images, got {tuple(pixel_mask.shape)}")
    if pixel_mask.dtype != torch.bool:
        raise TypeError(f"pixel_mask must be bool (True on padding), got {pixel_mask.dtype}; "
                        "use pixel_mask.bool() if it holds 0/1")


def _check_targets(targets: list[dict[str, Tensor]], batch_size: int, num_classes: int) -> None:
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target dicts for {batch_size} images")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise KeyError(f"target {i} needs 'labels' (N,) and 'boxes' (N, 4) normalised cxcywh; has {sorted(t)}")
        n = t["labels"].shape[0]
        if t["boxes"].shape != (n, 4):
            raise ValueError(f"target {i}: boxes must be ({n}, 4) to match {n} labels, got {tuple(t['boxes'].shape)}")
    labels = torch.cat([t["labels"].reshape(-1) for t in targets])
    if labels.numel():
        low, high = torch.stack(labels.aminmax()).tolist()  # one host sync per batch
        if low < 0 or high >= num_classes:
            raise ValueError(f"target labels must lie in [0, {num_classes}) (num_classes={num_classes}), got "
                             f"[{low}, {high}]; num_classes must come from the datamodule")
