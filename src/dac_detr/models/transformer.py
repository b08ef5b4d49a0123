"""Deformable transformer with the DAC dual decoder (docs/method.md, Encoder to The C-Decoder).

Module names follow the official checkpoint (``transformer.encoder.layers.N.self_attn...``,
``transformer.decoder.layers.N.{cross_attn,norm1,self_attn,norm2,linear1,linear2,norm3}``,
``transformer.{level_embed,enc_output,enc_output_norm,pos_trans,pos_trans_norm}``), so official
weights load without renaming these. The prediction heads live on the detector and are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dac_detr.boxes import inverse_sigmoid

from .deformable_attention import MSDeformAttn
from .position_encoding import box_sine_embedding


@dataclass
class FlatLevels:
    """Multi-scale maps flattened into one token sequence (S = Σ h_l·w_l)."""

    # (h_l, w_l) as Python ints (no host sync when iterating); symbolic sizes under torch.export
    shapes: list[tuple[int, int]]
    shapes_tensor: Tensor  # (L, 2) int64, the same on the device, for the kernel
    level_start_index: Tensor  # (L,) int64
    padding_mask: Tensor  # (B, S) bool, True on padding
    valid_sizes: Tensor  # (B, L, 2) int64 un-padded (w, h) of each level, in cells
    valid_ratios: Tensor  # (B, L, 2) un-padded fraction (w, h) of each level


@dataclass
class DecoderOutput:
    """Per decoder layer hidden states (B, N, d) and sigmoid cxcywh boxes (B, N, 4), N = DN + Q."""

    o_hidden: list[Tensor]
    o_boxes: list[Tensor]
    c_hidden: list[Tensor] | None  # C-stream (training with DAC only)
    c_boxes: list[Tensor] | None


class DeformableEncoderLayer(nn.Module):
    """Post-norm: x = LN1(x + MSDA(x + pos, ref, x)); x = LN2(x + FFN(x))."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, levels: FlatLevels) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, levels.shapes, levels.shapes_tensor,
                              levels.level_start_index, levels.padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(levels: FlatLevels, device: torch.device) -> Tensor:
        """Pixel centres of every level, in each image's un-padded frame, seen from every level.

        Returns (B, S, L, 2) (x, y): ((j + 0.5) / (r_w·W_l), (i + 0.5) / (r_h·H_l)) times the
        valid ratios of each target level (standard Deformable DETR).
        """
        per_level = []
        for lvl, (h, w) in enumerate(levels.shapes):
            # arange + 0.5 equals linspace(0.5, h - 0.5, h) exactly (step 1) and keeps h symbolic
            # under torch.export, where linspace's `steps` would pin it to the example's size.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (levels.valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (levels.valid_ratios[:, None, lvl, 0] * w)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference = torch.cat(per_level, 1)
        return reference[:, :, None] * levels.valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, levels: FlatLevels) -> Tensor:
        """src, pos (B, S, d) -> memory (B, S, d)."""
        reference = self.reference_points(levels, src.device)
        for layer in self.layers:
            src = layer(src, pos, reference, levels)
        return src


class DeformableDecoderLayer(nn.Module):
    """One decoder layer, split into the two blocks the O- and C-streams share.

    O-stream: ``self_attention`` then ``cross_attention_ffn``; C-stream: ``cross_attention_ffn``
    only, with the same module instances (docs/method.md, The C-Decoder).
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def self_attention(self, tgt: Tensor, query_pos: Tensor, attn_mask: Tensor | None) -> Tensor:
        """tgt = LN2(tgt + MHA(tgt + pos, tgt + pos, tgt)); attn_mask (N, N) True = blocked."""
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm2(tgt + self.dropout2(attn))

    def cross_attention_ffn(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                            levels: FlatLevels) -> Tensor:
        """tgt = LN1(tgt + MSDA(tgt + pos, ref, memory)); tgt = LN3(tgt + FFN(tgt))."""
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, levels.shapes, levels.shapes_tensor,
                               levels.level_start_index, levels.padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """sigmoid(delta + inverse_sigmoid(reference)): the box a head predicts relative to a reference.

    delta (B, N, 4) head output; reference (B, N, 4) boxes or (B, N, 2) points (then only the
    centre is relative and (w, h) come straight from the head, as in Deformable DETR).
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat((delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]), -1).sigmoid()


class DACDecoder(nn.Module):
    """Deformable decoder that runs the O-stream and, in training, the C-stream (docs/method.md, The
    C-Decoder)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        levels: FlatLevels,
        box_heads: nn.ModuleList,
        attn_mask: Tensor | None = None,
        box_refine: bool = True,
        look_forward_twice: bool = True,
        run_c_stream: bool = False,
        share_layer0_self_attn: bool = True,
    ) -> DecoderOutput:
        """tgt, query_pos (B, N, d); reference (B, N, 4) boxes or (B, N, 2) points in [0, 1].

        Box refinement: the reference of layer l+1 is detach(sigmoid(Δ_l + inverse_sigmoid(ref_l))).
        The box predicted at layer l is sigmoid(Δ_l + inverse_sigmoid(R_{l-1})) where R_{l-1} is
        the non-detached refined box of layer l-1 with look-forward-twice, its detached copy
        without, and the initial reference for l = 0 or without refinement. Δ_l = box_heads[l](h_l)
        is computed once per stream and layer and used for both.

        The C-stream skips self-attention, keeps its own reference chain and, with
        ``share_layer0_self_attn``, starts from the O-stream's layer-0 post-self-attention tensor
        (official, issue #2); otherwise from ``tgt``. It never feeds the O-stream.
        """
        o_state = _StreamState(tgt, reference)
        c_state = _StreamState(tgt, reference) if run_c_stream else None
        valid_scale = torch.cat([levels.valid_ratios, levels.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        out = DecoderOutput([], [], [] if run_c_stream else None, [] if run_c_stream else None)
        for lid, layer in enumerate(self.layers):
            post_self_attn = layer.self_attention(o_state.hidden, query_pos, attn_mask)
            if c_state is not None and lid == 0 and share_layer0_self_attn:
                c_state.hidden = post_self_attn
            o_state.hidden = layer.cross_attention_ffn(
                post_self_attn, query_pos, _scale_reference(o_state.reference, valid_scale), memory, levels)
            o_state.advance(box_heads[lid], box_refine, look_forward_twice, out.o_hidden, out.o_boxes)
            if c_state is not None:
                c_state.hidden = layer.cross_attention_ffn(
                    c_state.hidden, query_pos, _scale_reference(c_state.reference, valid_scale), memory, levels)
                c_state.advance(box_heads[lid], box_refine, look_forward_twice, out.c_hidden, out.c_boxes)
        return out


class _StreamState:
    """Hidden state and reference chain of one decoder stream."""

    def __init__(self, hidden: Tensor, reference: Tensor):
        self.hidden = hidden
        self.reference = reference  # what the next layer samples around (detached after refinement)
        self.prediction_base = reference  # R_{l-1}: what the next layer's box is predicted relative to

    def advance(self, box_head: nn.Module, box_refine: bool, look_forward_twice: bool,
                hidden_out: list[Tensor], boxes_out: list[Tensor]) -> None:
        delta = box_head(self.hidden)
        box = refine_boxes(delta, self.prediction_base)
        hidden_out.append(self.hidden)
        boxes_out.append(box)
        if box_refine:
            # same tensor (layer 0, or no look-forward-twice): same value and same gradient path
            new_reference = box if self.prediction_base is self.reference else refine_boxes(delta, self.reference)
            self.reference = new_reference.detach()
            self.prediction_base = new_reference if look_forward_twice else self.reference


def _scale_reference(reference: Tensor, valid_scale: Tensor) -> Tensor:
    """(B, N, 4|2) normalised to the un-padded image -> (B, N, L, 4|2) per-level coordinates."""
    return reference[:, :, None] * valid_scale[..., : reference.shape[-1]]


class DeformableTransformer(nn.Module):
    """Encoder, two-stage proposals, query construction and the dual decoder.

    Two-stage (``two_stage``): every encoder token proposes a box; the ``num_queries`` tokens
    with the highest class-0 logit give the initial references (detached). Their sine embedding
    through ``pos_trans`` gives the positional queries (first d channels) and, without
    ``mixed_selection``, the content queries (last d). With ``mixed_selection`` the content
    queries are the learned ``query_embed`` (d columns). Without two-stage, Deformable DETR's
    learned queries: ``query_embed`` has 2d columns (positional, content) and the references are
    ``sigmoid(reference_points(query_pos))`` points. DN queries (training) are prepended; their
    positional queries come from ``pos_trans`` of their noised boxes.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = True,
        mixed_selection: bool = True,
        embed_dn_boxes: bool = True,
    ):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.mixed_selection = mixed_selection
        common = dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                      n_heads=nhead)
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **common)
        self.decoder = DACDecoder(num_decoder_layers, n_points=dec_n_points, **common)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        # pos_trans embeds boxes into positional (and content) queries: the two-stage proposals,
        # and the DN boxes, which also exist without two-stage.
        if two_stage or embed_dn_boxes:
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    # ---------------------------------------------------------------- encoder side
    def flatten(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]
                ) -> tuple[Tensor, Tensor, FlatLevels]:
        """Per-level (B, d, h, w) maps, masks and positions -> tokens (B, S, d), pos + level embed."""
        # No int(): under torch.export the sizes stay symbolic, so one graph serves every image size.
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        device = srcs[0].device
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        starts, total = [], 0
        for h, w in shapes:
            starts.append(total)
            total += h * w
        valid_sizes = [valid_size(m) for m in masks]
        levels = FlatLevels(
            shapes=shapes,
            shapes_tensor=torch.tensor(shapes, dtype=torch.long, device=device),
            level_start_index=torch.tensor(starts, dtype=torch.long, device=device),
            padding_mask=torch.cat([m.flatten(1) for m in masks], 1),
            valid_sizes=torch.stack(valid_sizes, 1),
            valid_ratios=torch.stack([valid_ratio(size, h, w) for size, (h, w) in zip(valid_sizes, shapes)], 1),
        )
        return src_flat, pos_flat, levels

    def encoder_proposals(self, memory: Tensor, levels: FlatLevels) -> tuple[Tensor, Tensor]:
        """One proposal per encoder token (docs/method.md, Two-stage proposals).

        Returns output_memory (B, S, d) = LN(Linear(memory with padded/invalid tokens zeroed)) and
        proposal logits (B, S, 4): centre of the cell in the un-padded frame, w = h = 0.05·2^l,
        in logit space, +inf where padded or not inside (0.01, 0.99).
        """
        B = memory.shape[0]
        proposals = []
        for lvl, (h, w) in enumerate(levels.shapes):
            grid_y, grid_x = torch.meshgrid(  # = linspace(0, h - 1, h), traceable with a symbolic h
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            # divide by the integer cell counts, not ratio·size: that product need not round back
            scale = levels.valid_sizes[:, lvl].view(B, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(B, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = levels.padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), proposals

    # ---------------------------------------------------------------- queries
    def box_query_embedding(self, box_logits: Tensor) -> Tensor:
        """(B, N, 4) box logits -> (B, N, 2d) = LN(Linear(sine(box))); [:d] positional, [d:] content."""
        return self.pos_trans_norm(self.pos_trans(box_sine_embedding(box_logits, self.d_model // 2)))

    def initial_queries(
        self,
        batch_size: int,
        query_embed: Tensor | None,
        topk_box_logits: Tensor | None,
        dn_content: Tensor | None,
        dn_box_logits: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Content queries, positional queries (B, N, d) and initial references (B, N, 4|2).

        N = DN slots + matching queries, DN first. ``topk_box_logits`` (B, Q, 4) are the detached
        selected proposals (two-stage); ``query_embed`` is the learned (Q, d) or (Q, 2d) table.
        """
        d = self.d_model
        if self.two_stage:
            box_logits = topk_box_logits if dn_box_logits is None else torch.cat([dn_box_logits, topk_box_logits], 1)
            query_pos, content_from_boxes = self.box_query_embedding(box_logits).split(d, dim=-1)
            if self.mixed_selection:
                tgt = query_embed.unsqueeze(0).expand(batch_size, -1, -1)
            else:
                tgt = content_from_boxes[:, box_logits.shape[1] - topk_box_logits.shape[1]:]
            if dn_content is not None:
                tgt = torch.cat([dn_content, tgt], 1)
            return tgt, query_pos, box_logits.sigmoid()
        query_pos, tgt = query_embed.split(d, dim=-1)
        query_pos = query_pos.unsqueeze(0).expand(batch_size, -1, -1)
        tgt = tgt.unsqueeze(0).expand(batch_size, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        if dn_content is None:
            return tgt, query_pos, reference
        # Learned queries use point references; a DN query uses its noised box centre as its
        # point and the embedding of the whole noised box as its positional query.
        dn_pos = self.box_query_embedding(dn_box_logits)[..., :d]
        return (torch.cat([dn_content, tgt], 1), torch.cat([dn_pos, query_pos], 1),
                torch.cat([dn_box_logits[..., :2].sigmoid(), reference], 1))


def valid_size(mask: Tensor) -> Tensor:
    """(B, h, w) padding mask, True on padding -> (B, 2) int64 un-padded (w, h) in cells.

    Padding is bottom-right, so the first row holds every valid column and the first column
    every valid row. The one place the valid extent is read from a mask: the valid ratios and
    the encoder proposals both start from it (``DeformableTransformer.flatten``).
    """
    return torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)


def valid_ratio(size: Tensor, h: int, w: int) -> Tensor:
    """(B, 2) un-padded (w, h) of an h x w level (``valid_size``) -> (B, 2) un-padded fraction (w, h)."""
    size = size.float()
    return torch.stack([size[:, 0] / w, size[:, 1] / h], -1)
