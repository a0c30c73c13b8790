"""The compressor's decode update in one kernel: write the token's row into its ring and pool
the ring into the token's entry (engine.attention.Compressor, one token per sequence).

Per sequence b at position p (ratio r, ring width W = 2r if overlapping else r, d channels
out, C = 2d in if overlapping else d):

  ring_kv[slot, p % W]    = kv[b]                          (the token's projection, [C])
  ring_score[slot, p % W] = score[b] + ape[p % r]
  entry[b, c] = sum_i ring_kv[slot, row_i, ch_i(c)] * softmax_i(ring_score[slot, row_i, ch_i(c)])

  not overlapping (r = 128): row_i = i for i < r, ch_i(c) = c
  overlapping (r = 4, Compressor.overlap): entry j = p // r pools block j-1's channels [:d]
    (rows i < r, at ring offset r - (j % 2) * r) and block j's channels [d:] (rows i >= r, at
    offset (j % 2) * r); block j-1 of entry 0 does not exist (kv 0, score -inf)

The entry is only kept where it completes (p + 1) % r == 0; before that it pools rows the
block has not written yet, as the reference step does, and the caller writes it nowhere.

Why a kernel: on torch this was ~12 launches a compressor (the ape gather and add, two ring
scatters, the pooled rows' gathers, where / masked_fill, a softmax over dim 1, mul, sum);
the dim-1 softmax alone measured 25 us a call on an H100 (cunn_SpatialSoftMaxForward with
a tiny grid), 0.7 ms of a 20-layer decode step.

Algorithm: one program per (sequence, block of output channels). It writes its own channel
slices of the new row (both halves when overlapping: the two input channels it reads), then
loads the [P, BLOCK_D] pooled tile (P = 2r or r rows) and replaces the new row's place with
the values it just computed in registers, so nothing waits on its own store. Softmax over
rows per channel in fp32, then the weighted sum: sum(kv * e) / sum(e) with e = exp(s - max).

Shapes: B sequences, S slots.
    kv, score  [B, C] fp32 (unit stride along C)      ape [r, C] fp32
    ring_kv, ring_score [S, W, C] fp32 contiguous     slots, positions [B] int64
    out: entry [B, d] fp32
"""

from __future__ import annotations

import torch

from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import wait_for_inputs
from engine.kernels._triton import cdiv, jit, next_power_of_2

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

TILE = 2048  # pooled rows x channels a program holds: 128 x 16 (r = 128), 8 x 256 (r = 4)


def overlap_rows(positions: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pooled ring rows of an overlapping compressor: (rows [B, 2r], low [1, 2r, 1]: which
    pooled rows take channels [:d], empty [B, 2r, 1]: the rows of entry 0's missing block)."""
    j = positions // r
    cur = (j % 2) * r
    offs = torch.arange(2 * r, device=positions.device)
    low = offs < r
    rows = torch.where(low, r - cur.unsqueeze(-1), cur.unsqueeze(-1)) + offs % r
    empty = (j == 0).unsqueeze(-1) & low
    return rows, low.view(1, -1, 1), empty.unsqueeze(-1)


def compress_pool_reference(kv, score, ape, ring_kv, ring_score, slots, positions, ratio: int,
                            overlap: bool, pooled_rows=None) -> torch.Tensor:
    """The torch ops the kernel replaces; `pooled_rows` is overlap_rows(positions, ratio)
    when the caller has it already (it is the same for every layer of a step)."""
    d = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    ring = positions % ring_kv.shape[1]
    ring_kv[slots, ring] = kv
    ring_score[slots, ring] = score + ape[positions % ratio]
    if overlap:
        rows, low, empty = pooled_rows or overlap_rows(positions, ratio)
        s = slots.unsqueeze(-1)
        g_kv, g_sc = ring_kv[s, rows], ring_score[s, rows]  # [B, 2r, 2d]
        pool_kv = torch.where(low, g_kv[..., :d], g_kv[..., d:]).masked_fill(empty, 0.0)
        pool_sc = torch.where(low, g_sc[..., :d], g_sc[..., d:]).masked_fill(empty, float("-inf"))
    else:
        pool_kv, pool_sc = ring_kv[slots], ring_score[slots]  # slot i = position j*r + i
    return (pool_kv * pool_sc.softmax(dim=1)).sum(dim=1)  # [B, d]


@jit
def _compress_pool_kernel(
    kv_ptr,  # [B, C] f32
    score_ptr,  # [B, C] f32
    ape_ptr,  # [r, C] f32
    ring_kv_ptr,  # [S, W, C] f32
    ring_sc_ptr,  # [S, W, C] f32
    slots_ptr,  # [B] i64
    pos_ptr,  # [B] i64
    out_ptr,  # [B, d] f32
    d,
    stride_kv,
    stride_score,
    stride_ring_s,
    stride_ring_w,
    stride_out,
    RATIO: tl.constexpr,
    P: tl.constexpr,  # pooled rows = ring width: 2 * RATIO if OVERLAP else RATIO
    OVERLAP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < d
    slot = tl.load(slots_ptr + b)
    p = tl.load(pos_ptr + b)
    new_row = p % P
    ring_kv = ring_kv_ptr + slot * stride_ring_s
    ring_sc = ring_sc_ptr + slot * stride_ring_s
    ape = ape_ptr + (p % RATIO) * stride_ring_w  # ape rows are C wide, as the ring's

    # the token's row, channels [c] (and [d + c]): into the ring, and kept for the tile
    kv_lo = tl.load(kv_ptr + b * stride_kv + offs_c, mask=c_mask, other=0.0)
    sc_lo = tl.load(score_ptr + b * stride_score + offs_c, mask=c_mask, other=0.0)
    sc_lo += tl.load(ape + offs_c, mask=c_mask, other=0.0)
    tl.store(ring_kv + new_row * stride_ring_w + offs_c, kv_lo, mask=c_mask)
    tl.store(ring_sc + new_row * stride_ring_w + offs_c, sc_lo, mask=c_mask)

    offs_i = tl.arange(0, P)
    tile_mask = c_mask[None, :]
    if OVERLAP:
        kv_hi = tl.load(kv_ptr + b * stride_kv + d + offs_c, mask=c_mask, other=0.0)
        sc_hi = tl.load(score_ptr + b * stride_score + d + offs_c, mask=c_mask, other=0.0)
        sc_hi += tl.load(ape + d + offs_c, mask=c_mask, other=0.0)
        tl.store(ring_kv + new_row * stride_ring_w + d + offs_c, kv_hi, mask=c_mask)
        tl.store(ring_sc + new_row * stride_ring_w + d + offs_c, sc_hi, mask=c_mask)
        j = p // RATIO
        cur = (j % 2) * RATIO
        low = offs_i < RATIO
        rows = tl.where(low, RATIO - cur + offs_i, cur + offs_i - RATIO)
        at = rows[:, None] * stride_ring_w + offs_c[None, :] + tl.where(low, 0, d)[:, None]
        new_kv = tl.where(low[:, None], kv_lo[None, :], kv_hi[None, :])
        new_sc = tl.where(low[:, None], sc_lo[None, :], sc_hi[None, :])
    else:
        rows = offs_i
        at = rows[:, None] * stride_ring_w + offs_c[None, :]  # [P, BLOCK_D]
        new_kv = kv_lo[None, :]
        new_sc = sc_lo[None, :]
    g_kv = tl.load(ring_kv + at, mask=tile_mask, other=0.0)
    g_sc = tl.load(ring_sc + at, mask=tile_mask, other=0.0)
    is_new = (rows == new_row)[:, None]
    g_kv = tl.where(is_new, new_kv, g_kv)
    g_sc = tl.where(is_new, new_sc, g_sc)
    if OVERLAP:  # entry 0: block -1 does not exist
        empty = (low & (j == 0))[:, None]
        g_kv = tl.where(empty, 0.0, g_kv)
        g_sc = tl.where(empty, float("-inf"), g_sc)
    m = tl.max(g_sc, axis=0)
    e = tl.exp(g_sc - m[None, :])
    entry = tl.sum(g_kv * e, axis=0) / tl.sum(e, axis=0)
    tl.store(out_ptr + b * stride_out + offs_c, entry, mask=c_mask)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor,
                  ring_kv: torch.Tensor, ring_score: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor, ratio: int, overlap: bool,
                  pooled_rows=None) -> torch.Tensor:
    """Write each token's row into its ring; return the entries it pools, fp32 [B, d]."""
    if not use_triton(kv):
        return compress_pool_reference(kv, score, ape, ring_kv, ring_score, slots, positions,
                                       ratio, overlap, pooled_rows)
    B, C = kv.shape
    W = 2 * ratio if overlap else ratio
    d = C // 2 if overlap else C
    if (score.shape != kv.shape or ape.shape != (ratio, C) or ring_kv.dim() != 3
            or ring_kv.shape[1:] != (W, C) or ring_score.shape != ring_kv.shape):
        raise ValueError(f"compress_pool: kv {list(kv.shape)}, score {list(score.shape)}, ape "
                         f"{list(ape.shape)}, rings {list(ring_kv.shape)} / "
                         f"{list(ring_score.shape)} do not fit ratio {ratio}, overlap {overlap}")
    if (any(t.dtype != torch.float32 for t in (kv, score, ape, ring_kv, ring_score))
            or kv.stride(1) != 1 or score.stride(1) != 1 or not ape.is_contiguous()
            or not ring_kv.is_contiguous() or not ring_score.is_contiguous()):
        raise ValueError("compress_pool: fp32 inputs, unit stride along C, contiguous rings")
    out = torch.empty(B, d, dtype=torch.float32, device=kv.device)
    if B:
        block_d = min(next_power_of_2(d), max(16, TILE // W))
        _compress_pool_kernel[(B, cdiv(d, block_d))](
            kv, score, ape, ring_kv, ring_score, slots, positions, out,
            d, kv.stride(0), score.stride(0), ring_kv.stride(0), ring_kv.stride(1),
            out.stride(0), RATIO=ratio, P=W, OVERLAP=overlap, BLOCK_D=block_d,
            **pdl_launch(kv),
        )  # fmt: skip
    return out
