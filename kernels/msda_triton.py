"""Triton forward and backward kernels for multi-scale deformable attention.

Semantics are those of the reference Deformable-DETR op (docs/kernels.md, Reference semantics),
reproduced by ``msda_torch.ms_deform_attn_torch``:

* a sample at (x, y) in [0, 1] on a level of size (h_l, w_l) sits at pixel
  ``(w_im, h_im) = (x * w_l - 0.5, y * h_l - 0.5)`` (``align_corners=False``);
* it is skipped entirely unless ``-1 < h_im < h_l`` and ``-1 < w_im < w_l``; inside that window
  each of its four bilinear corners is read only if it lies on the map (zero padding);
* the bilinear blend is multiplied by the attention weight and summed over levels and points.

Layout of one program (docs/kernels.md, Triton forward): the grid is ``(cdiv(Q, BLOCK_Q), H, B)``; a
program owns ``BLOCK_Q`` neighbouring queries of one head of one image and works on ``[BLOCK_Q,
BLOCK_D]`` tiles. L and P are constexpr; the loop over points is unrolled, the loop over levels is a
runtime loop on purpose: unrolling both lets the compiler hoist all L*P*4 gathers, and at L = P = 4
ptxas (CUDA 12.9, sm_90a) then spilled ~8.7 KB per thread in the forward, while the level loop keeps
it at ~108 registers with no spills (bf16, D = 32) and compiles 7x faster. All coordinate and weight
math runs in fp32 (fp64 when the value is fp64); values of any float dtype are upcast on load.

The level table (h_l, w_l, start_l) is read from a small int32 tensor at run time, and the query
and key counts are not specialised, so a new padded image size never recompiles a kernel.

The backward recomputes the corners, gets the location and weight gradients from row reductions
over the head dimension (one program owns whole (query, head) rows, so these are plain stores),
and scatters ``grad_value`` with relaxed atomic adds into an fp32 buffer that the launcher casts
once to the value dtype. Atomic accumulation makes ``grad_value`` nondeterministic in its last
bits; ``ops.py`` honours ``torch.use_deterministic_algorithms`` for that reason.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Whether the kernels below were decorated in interpreter mode. Triton decides this when
# ``@triton.jit`` runs (this import), from TRITON_INTERPRET; changing the variable later has no
# effect on kernels that already exist.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@triton.jit
def _bilinear_sample_geometry(x, y, level_h, level_w, q_mask):
    """Pixel-space geometry of one [BLOCK_Q] batch of samples on one level.

    Returns the integer top-left corner (x0, y0), the fractional offsets (lw, lh), and the
    per-corner validity masks (top-left, top-right, bottom-left, bottom-right). A corner is valid
    when the sample lies in the reference window (-1, size) on both axes, the corner lies on the
    map, and the query row exists.
    """
    w_f = level_w.to(x.dtype)
    h_f = level_h.to(x.dtype)
    w_im = x * w_f - 0.5
    h_im = y * h_f - 0.5
    # The reference skips the whole sample outside this window (NaN compares False: skipped too).
    inside = (w_im > -1.0) & (h_im > -1.0) & (w_im < w_f) & (h_im < h_f) & q_mask
    # Clamping only moves samples that are skipped anyway; it keeps the float->int conversion
    # defined for far-away (or infinite) locations.
    w_im = tl.minimum(tl.maximum(w_im, -2.0), w_f + 1.0)
    h_im = tl.minimum(tl.maximum(h_im, -2.0), h_f + 1.0)
    x0_f = tl.floor(w_im)
    y0_f = tl.floor(h_im)
    lw = w_im - x0_f
    lh = h_im - y0_f
    x0 = x0_f.to(tl.int32)
    y0 = y0_f.to(tl.int32)
    x0_ok = x0 >= 0
    x1_ok = (x0 + 1) < level_w
    y0_ok = y0 >= 0
    y1_ok = (y0 + 1) < level_h
    valid00 = inside & y0_ok & x0_ok
    valid01 = inside & y0_ok & x1_ok
    valid10 = inside & y1_ok & x0_ok
    valid11 = inside & y1_ok & x1_ok
    return x0, y0, lw, lh, valid00, valid01, valid10, valid11


@triton.jit
def _corner_offsets(level_start, level_w, xi, yi, valid, d, ROW_STRIDE: tl.constexpr):
    """[BLOCK_Q, BLOCK_D] element offsets of one corner row inside a (S, H, D) image+head slab.

    Invalid lanes point at key 0 so that no masked-off lane ever forms a wild address.
    """
    key = tl.where(valid, level_start + yi * level_w + xi, 0)
    return key.to(tl.int64)[:, None] * ROW_STRIDE + d[None, :]


@triton.jit(do_not_specialize=["num_queries", "num_keys"])
def _msda_forward_kernel(
    value_ptr,  # (B, S, H, D), any float dtype
    level_meta_ptr,  # (L, 3) int32: h_l, w_l, start_l
    loc_ptr,  # (B, Q, H, L, P, 2), any float dtype
    attn_ptr,  # (B, Q, H, L, P), any float dtype
    out_ptr,  # (B, Q, H, D), value dtype
    num_queries,
    num_keys,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # int64 base offsets: B*S*H*D may exceed 2^31

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM

    row = (batch * num_queries + q) * NUM_HEADS + head  # (b, q, h) row, int64 [BLOCK_Q]
    loc_row = loc_ptr + row * (NUM_LEVELS * NUM_POINTS * 2)
    attn_row = attn_ptr + row * (NUM_LEVELS * NUM_POINTS)
    value_slab = value_ptr + batch * num_keys * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
    for level in range(NUM_LEVELS):  # runtime loop: bounds register pressure (module docstring)
        level_h = tl.load(level_meta_ptr + 3 * level)
        level_w = tl.load(level_meta_ptr + 3 * level + 1)
        level_start = tl.load(level_meta_ptr + 3 * level + 2)
        for point in tl.static_range(NUM_POINTS):
            k = level * NUM_POINTS + point
            x = tl.load(loc_row + 2 * k, mask=q_mask, other=0.0).to(ACC_DTYPE)
            y = tl.load(loc_row + 2 * k + 1, mask=q_mask, other=0.0).to(ACC_DTYPE)
            a = tl.load(attn_row + k, mask=q_mask, other=0.0).to(ACC_DTYPE)
            x0, y0, lw, lh, v00, v01, v10, v11 = _bilinear_sample_geometry(x, y, level_h, level_w, q_mask)
            off00 = _corner_offsets(level_start, level_w, x0, y0, v00, d, NUM_HEADS * HEAD_DIM)
            off01 = _corner_offsets(level_start, level_w, x0 + 1, y0, v01, d, NUM_HEADS * HEAD_DIM)
            off10 = _corner_offsets(level_start, level_w, x0, y0 + 1, v10, d, NUM_HEADS * HEAD_DIM)
            off11 = _corner_offsets(level_start, level_w, x0 + 1, y0 + 1, v11, d, NUM_HEADS * HEAD_DIM)
            c00 = tl.load(value_slab + off00, mask=v00[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
            c01 = tl.load(value_slab + off01, mask=v01[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
            c10 = tl.load(value_slab + off10, mask=v10[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
            c11 = tl.load(value_slab + off11, mask=v11[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
            hw = 1.0 - lw
            hh = 1.0 - lh
            acc += (a * hh * hw)[:, None] * c00
            acc += (a * hh * lw)[:, None] * c01
            acc += (a * lh * hw)[:, None] * c10
            acc += (a * lh * lw)[:, None] * c11

    out_offsets = row[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_queries", "num_keys"])
def _msda_backward_kernel(
    value_ptr,  # (B, S, H, D), any float dtype
    level_meta_ptr,  # (L, 3) int32: h_l, w_l, start_l
    loc_ptr,  # (B, Q, H, L, P, 2)
    attn_ptr,  # (B, Q, H, L, P)
    grad_out_ptr,  # (B, Q, H, D)
    grad_value_ptr,  # (B, S, H, D), fp32 (fp64 for fp64 values), zero-initialised, accumulated
    grad_loc_ptr,  # (B, Q, H, L, P, 2), written
    grad_attn_ptr,  # (B, Q, H, L, P), written
    num_queries,
    num_keys,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    # Four contiguous elements per thread along D: the layout Triton gives the fp32 grad_value
    # atomics (v4.f32). With 2-byte values the loads would otherwise take 8 per thread and every
    # corner's scatter tile would cross a shared-memory layout conversion (2 barriers each).
    d = tl.max_contiguous(tl.arange(0, BLOCK_D), 4)
    d_mask = d < HEAD_DIM
    tile_mask = q_mask[:, None] & d_mask[None, :]

    row = (batch * num_queries + q) * NUM_HEADS + head
    loc_row = row * (NUM_LEVELS * NUM_POINTS * 2)
    attn_row = row * (NUM_LEVELS * NUM_POINTS)
    slab = batch * num_keys * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
    value_slab = value_ptr + slab
    grad_value_slab = grad_value_ptr + slab

    grad_out = tl.load(grad_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=tile_mask, other=0.0)
    grad_out = grad_out.to(ACC_DTYPE)

    for level in range(NUM_LEVELS):
        level_h = tl.load(level_meta_ptr + 3 * level)
        level_w = tl.load(level_meta_ptr + 3 * level + 1)
        level_start = tl.load(level_meta_ptr + 3 * level + 2)
        for point in tl.static_range(NUM_POINTS):
            k = level * NUM_POINTS + point
            x = tl.load(loc_ptr + loc_row + 2 * k, mask=q_mask, other=0.0).to(ACC_DTYPE)
            y = tl.load(loc_ptr + loc_row + 2 * k + 1, mask=q_mask, other=0.0).to(ACC_DTYPE)
            a = tl.load(attn_ptr + attn_row + k, mask=q_mask, other=0.0).to(ACC_DTYPE)
            x0, y0, lw, lh, v00, v01, v10, v11 = _bilinear_sample_geometry(x, y, level_h, level_w, q_mask)
            off00 = _corner_offsets(level_start, level_w, x0, y0, v00, d, NUM_HEADS * HEAD_DIM)
            off01 = _corner_offsets(level_start, level_w, x0 + 1, y0, v01, d, NUM_HEADS * HEAD_DIM)
            off10 = _corner_offsets(level_start, level_w, x0, y0 + 1, v10, d, NUM_HEADS * HEAD_DIM)
            off11 = _corner_offsets(level_start, level_w, x0 + 1, y0 + 1, v11, d, NUM_HEADS * HEAD_DIM)
            m00 = v00[:, None] & d_mask[None, :]
            m01 = v01[:, None] & d_mask[None, :]
            m10 = v10[:, None] & d_mask[None, :]
            m11 = v11[:, None] & d_mask[None, :]
            # Per-corner dot products <grad_out, corner value> over the head dimension; every
            # location and weight gradient of this sample is a combination of these four.
            t00 = tl.sum(grad_out * tl.load(value_slab + off00, mask=m00, other=0.0).to(ACC_DTYPE), axis=1)
            t01 = tl.sum(grad_out * tl.load(value_slab + off01, mask=m01, other=0.0).to(ACC_DTYPE), axis=1)
            t10 = tl.sum(grad_out * tl.load(value_slab + off10, mask=m10, other=0.0).to(ACC_DTYPE), axis=1)
            t11 = tl.sum(grad_out * tl.load(value_slab + off11, mask=m11, other=0.0).to(ACC_DTYPE), axis=1)
            hw = 1.0 - lw
            hh = 1.0 - lh
            w00 = hh * hw
            w01 = hh * lw
            w10 = lh * hw
            w11 = lh * lw
            grad_a = w00 * t00 + w01 * t01 + w10 * t10 + w11 * t11
            # d(sample)/d(w_im) and d(sample)/d(h_im), times the chain factor of the level size.
            grad_x = a * (hh * (t01 - t00) + lh * (t11 - t10)) * level_w.to(ACC_DTYPE)
            grad_y = a * (hw * (t10 - t00) + lw * (t11 - t01)) * level_h.to(ACC_DTYPE)
            tl.store(grad_attn_ptr + attn_row + k, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + loc_row + 2 * k, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + loc_row + 2 * k + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)

            # grad_value: the four corners of one sample back to back, relaxed (no fence).
            scaled = grad_out * a[:, None]
            tl.atomic_add(grad_value_slab + off00, scaled * w00[:, None], mask=m00, sem="relaxed")
            tl.atomic_add(grad_value_slab + off01, scaled * w01[:, None], mask=m01, sem="relaxed")
            tl.atomic_add(grad_value_slab + off10, scaled * w10[:, None], mask=m10, sem="relaxed")
            tl.atomic_add(grad_value_slab + off11, scaled * w11[:, None], mask=m11, sem="relaxed")


def level_metadata(spatial_shapes: Tensor, level_start_index: Tensor, device: torch.device) -> Tensor:
    """(L, 2) level sizes and (L,) starts -> (L, 3) int32 table [h_l, w_l, start_l] on ``device``.

    Pure device ops (no host sync), so it is safe inside CUDA graphs when the inputs already live
    on ``device``.
    """
    table = torch.cat([spatial_shapes.reshape(-1, 2), level_start_index.reshape(-1, 1)], dim=1)
    return table.to(device=device, dtype=torch.int32).contiguous()


def _launch_config(num_queries: int, head_dim: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, num_warps): a fixed heuristic, no autotuning (docs/kernels.md, Block
    sizes).

    On a GPU the tile holds about 2048 (forward) or 1024 (backward) elements, so that the four
    corner tiles of one sample stay in registers with 4 warps. In the interpreter every program
    costs Python overhead, so the tile takes as many queries as possible.
    """
    block_d = triton.next_power_of_2(max(head_dim, 1))
    if INTERPRETED:
        return min(64, triton.next_power_of_2(max(num_queries, 1))), block_d, 4
    budget = 1024 if backward else 2048
    block_q = max(4, min(128, budget // block_d))
    return block_q, block_d, 4


def _accumulator_dtype(value: Tensor):
    return tl.float64 if value.dtype == torch.float64 else tl.float32


def ms_deform_attn_triton_forward(
    value: Tensor, level_meta: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """value (B, S, H, D); level_meta (L, 3) int32 from ``level_metadata``;
    sampling_locations (B, Q, H, L, P, 2); attention_weights (B, Q, H, L, P) -> (B, Q, H*D) in
    value's dtype."""
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = torch.empty((B, Q, H * D), device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out
    block_q, block_d, num_warps = _launch_config(Q, D, backward=False)
    grid = (triton.cdiv(Q, block_q), H, B)
    _msda_forward_kernel[grid](
        value, level_meta, sampling_locations, attention_weights, out,
        Q, S,
        NUM_HEADS=H, HEAD_DIM=D, BLOCK_D=block_d, NUM_LEVELS=L, NUM_POINTS=P, BLOCK_Q=block_q,
        ACC_DTYPE=_accumulator_dtype(value), num_warps=num_warps,
    )  # fmt: skip
    return out


def ms_deform_attn_triton_backward(
    grad_output: Tensor,
    value: Tensor,
    level_meta: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_output (B, Q, H*D) -> (grad_value, grad_sampling_locations, grad_attention_weights),
    each in the dtype and shape of its input."""
    grad_output = grad_output.contiguous()
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # fp32 accumulation buffer whatever the value dtype; fp32 values accumulate in place.
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, device=value.device, dtype=acc_dtype)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    if grad_output.numel() == 0 or value.numel() == 0:
        grad_loc.zero_()
        grad_attn.zero_()
        return grad_value.to(value.dtype), grad_loc, grad_attn
    block_q, block_d, num_warps = _launch_config(Q, D, backward=True)
    grid = (triton.cdiv(Q, block_q), H, B)
    _msda_backward_kernel[grid](
        value, level_meta, sampling_locations, attention_weights, grad_output,
        grad_value, grad_loc, grad_attn,
        Q, S,
        NUM_HEADS=H, HEAD_DIM=D, BLOCK_D=block_d, NUM_LEVELS=L, NUM_POINTS=P, BLOCK_Q=block_q,
        ACC_DTYPE=_accumulator_dtype(value), num_warps=num_warps,
    )  # fmt: skip
    return grad_value.to(value.dtype), grad_loc, grad_attn


def compiled_variant_count() -> int:
    """How many compiled variants the two kernels hold (GPU only; used to check that a new padded
    image size does not recompile). Triton 3.2-3.3 keep ``cache``, later ones ``device_caches``."""
    total = 0
    for kernel in (_msda_forward_kernel, _msda_backward_kernel):
        if hasattr(kernel, "device_caches"):
            total += sum(len(entry[0]) for entry in kernel.device_caches.values())
        else:
            total += sum(len(entry) for entry in kernel.cache.values())
    return total
