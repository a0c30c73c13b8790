"""A decode step's new cache rows in one kernel: RMSNorm, RoPE and the QAT rounding, stored
straight into the pool (or returned), where engine/decode.py ran 3 to 5 kernels per row kind:

  kv           [B, 512] bf16   kv_norm, RoPE, FP8 of the 448 nope channels -> window[slot, p % W]
  entry        [B, 512] fp32   the compressor's norm, RoPE, FP8 prefix -> entries[slot', j]
  index key    [B, 128] fp32   the indexer compressor's norm, RoPE, Hadamard + FP4
                               -> index_keys[slot', j]
  index query  [B, 64, 128]    RoPE, Hadamard + FP4 -> returned as fp32

Per row x (D channels, the last R = 2 * cos.shape[-1] rotate in interleaved pairs), what the
unfused chain computes (rmsnorm_rope / rope, fp8_roundtrip_prefix or hadamard + fp4_roundtrip,
the cast of the index_put):

  y = x * rsqrt(mean(x^2) + eps) * weight      with norm (else y = x)
  y = RoPE(round_x(y)), rounded to x's dtype   (round_x: to bf16 when x is bf16)
  qat "fp8": y[:nope] = fp8_roundtrip(y[:nope]) in blocks of 64   (engine.attention)
  qat "fp4": y = fp4_roundtrip(hadamard(y)) in blocks of 32, fp32
  the destination gets y in its dtype (bf16: rounded to nearest even)

The kernel computes the unfused chain's fp32 formulas; its sums (the norm's, the Hadamard's:
a butterfly scaled once at the end, where the reference matmul sums products with the
scaled matrix) run in another order, so a value that lands within a few ulps of a bf16 /
e4m3 / e2m1 rounding midpoint can take the neighbouring value (the test bounds exactly that).

Why fuse: at batch 1 each of those kernels moves 1..16 KB and costs its launch (~2 us in a
graph); per 43-layer step this file replaces about 350 launches with 125.

Algorithm: one program per block of rows (a row is one token's vector, or one head of it).
Each channel is loaded together with its RoPE partner (channel ^ 1), so the interleaved
pairs rotate without shuffles and the whole row stays one [rows, D] tile, which the QAT
blocks (a reshape) and the Hadamard (engine/kernels/_device_math.py hadamard_rows: the
butterfly on reshapes, no [D, D] matrix in registers) need.

Shapes: N tokens, Hx heads (1 for the cache rows), D channels, S pool slots, L rows a slot.
    x [N, D] or [N, Hx, D] bf16 / fp32      weight [D]     cos, sin [N, R/2] fp32
    dst [S, L, D] bf16 / fp32, slots and rows [N] int64: dst[slots[n], rows[n]] = y[n]
"""

from __future__ import annotations

import functools

import torch

from engine.attention import _hadamard, hadamard
from engine.attention import fp8_roundtrip as fp8_roundtrip_reference
from engine.config import QAT_INDEXER_FP4_BLOCK, QAT_KV_FP8_BLOCK
from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import (
    e2m1_qat,
    e4m3_qat,
    hadamard_rows,
    round_bf16,
    wait_for_inputs,
)
from engine.kernels._triton import cdiv, jit, next_power_of_2
from engine.kernels.fp4_roundtrip import fp4_roundtrip_reference
from engine.kernels.rmsnorm_rope import rmsnorm_rope_reference, rope_reference

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

Norm = tuple[torch.Tensor, float]  # an RMSNorm's (weight [D], eps)
QAT_CODES = {None: 0, "fp8": 1, "fp4": 2}
BLOCK_ROWS = 4  # rows a program: 4 x 512 fp32 and their partners, 32 values a thread


# ---------------------------------------------------------------------------------------------
# Reference: the unfused chain the decode step ran before
# ---------------------------------------------------------------------------------------------
def cache_rows_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         norm: Norm | None, qat: str | None, nope: int) -> torch.Tensor:
    """The rows' final values, in x's dtype (fp32 after the Hadamard); graph-safe on CUDA
    (the decode step's reference path is captured too)."""
    if norm is not None:
        y = rmsnorm_rope_reference(x, norm[0], cos, sin, norm[1])
    else:
        y = rope_reference(x, cos, sin)
    if qat == "fp8":
        y = torch.cat([fp8_roundtrip_reference(y[..., :nope], QAT_KV_FP8_BLOCK), y[..., nope:]], -1)
    elif qat == "fp4":
        y = fp4_roundtrip_reference(hadamard(y), QAT_INDEXER_FP4_BLOCK)
    return y


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@jit
def _cache_rows_kernel(
    x_ptr,  # [N, Hx, D] (any token / head strides): row r is token r // Hx, head r % Hx
    w_ptr,  # [D] norm weight (x_ptr when not HAS_WEIGHT: never read)
    cos_ptr,  # [N, R/2] f32
    sin_ptr,  # [N, R/2] f32
    out_ptr,  # dst [S, L, D] (SCATTER) or out [N, Hx, D]
    slot_ptr,  # [N] int64 destination slot (SCATTER only)
    row_ptr,  # [N] int64 destination row within the slot (SCATTER only)
    num_rows,
    heads,
    dim,
    rope_half,
    eps,
    hadamard_scale,  # fp32 1/sqrt(D), the reference matrix's entry
    stride_x_n,
    stride_x_h,
    stride_c_n,
    stride_o_a,  # dst's slot stride, or out's token stride
    stride_o_b,  # dst's row stride, or out's head stride
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOG2_D: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROUND_X: tl.constexpr,
    QAT: tl.constexpr,  # 0 none, 1 FP8 of the nope prefix, 2 Hadamard + FP4
    SCATTER: tl.constexpr,
    ROUND_OUT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r_mask = r < num_rows
    tok = (r // heads).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    nope = dim - 2 * rope_half
    is_rope = (d >= nope) & d_mask
    mask = r_mask[:, None] & d_mask[None, :]
    pair_mask = r_mask[:, None] & is_rope[None, :]
    rows_x = x_ptr + (tok * stride_x_n + (r % heads).to(tl.int64) * stride_x_h)[:, None]
    partner = d ^ 1  # the other channel of d's rotating pair (rope channels start even)
    x = tl.load(rows_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows_x + partner[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)  # [BLOCK_ROWS]
        x = x * rstd[:, None]
        xp = xp * rstd[:, None]
        if HAS_WEIGHT:
            x = x * tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            xp = xp * tl.load(w_ptr + partner, mask=is_rope, other=0.0).to(tl.float32)[None, :]
        if ROUND_X:  # rmsnorm_rope rotates the normed row rounded to x's dtype
            x = round_bf16(x)
            xp = round_bf16(xp)
    half = tl.where(is_rope, (d - nope) >> 1, 0)  # the pair's frequency
    c_off = tok[:, None] * stride_c_n + half[None, :]
    cos = tl.load(cos_ptr + c_off, mask=pair_mask, other=1.0)
    sin = tl.load(sin_ptr + c_off, mask=pair_mask, other=0.0)
    even = ((d & 1) == 0)[None, :]
    # even channel a, odd b: (a cos - b sin, a sin + b cos), written as rmsnorm_rope writes it
    rot = tl.where(even, x * cos - xp * sin, xp * sin + x * cos)
    if ROUND_X:
        rot = round_bf16(rot)
    y = tl.where(is_rope[None, :], rot, x)

    if QAT == 1:  # FP8 round trip of the nope channels, blocks of 64 (nope a multiple of 64)
        yb = tl.reshape(y, [BLOCK_ROWS, BLOCK_D // 64, 64])
        q = e4m3_qat(yb, tl.max(tl.abs(yb), axis=2)[:, :, None])
        in_nope = (tl.arange(0, BLOCK_D // 64) * 64 < nope)[None, :, None]
        y = tl.reshape(tl.where(in_nope, q, yb), [BLOCK_ROWS, BLOCK_D])
    if QAT == 2:  # Hadamard (BLOCK_D == D, a power of two), then FP4 in blocks of 32
        z = hadamard_rows(y, hadamard_scale, BLOCK_ROWS, BLOCK_D, LOG2_D)
        zb = tl.reshape(z, [BLOCK_ROWS, BLOCK_D // 32, 32])
        y = tl.reshape(e2m1_qat(zb, tl.max(tl.abs(zb), axis=2)[:, :, None]),
                       [BLOCK_ROWS, BLOCK_D])  # fmt: skip

    if SCATTER:
        a = tl.load(slot_ptr + tok, mask=r_mask, other=0)
        b = tl.load(row_ptr + tok, mask=r_mask, other=0)
    else:
        a = tok
        b = r % heads
    if ROUND_OUT:  # a bf16 destination: nearest even (the interpreter's cast truncates)
        y = round_bf16(y)
    out = out_ptr + a.to(tl.int64)[:, None] * stride_o_a + b.to(tl.int64)[:, None] * stride_o_b
    tl.store(out + d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
@functools.cache
def _hadamard_entry(n: int) -> float:
    """The reference matrix's +1/sqrt(n), as rounded there (read on the host, once)."""
    return float(_hadamard(n, "cpu")[0, 0])


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: Norm | None,
           qat: str | None, nope: int) -> None:
    if qat not in QAT_CODES:
        raise ValueError(f"qat must be one of {list(QAT_CODES)}, got {qat!r}")
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() not in (2, 3):
        raise ValueError(f"x must be bf16 or fp32 [N, D] or [N, Hx, D], got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    n, d = x.shape[0], x.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != n or 2 * cos.shape[1] > d:
        raise ValueError(f"cos and sin must be [{n}, R/2] with R <= {d}, got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")  # fmt: skip
    if (d - 2 * cos.shape[1]) % 2:
        raise ValueError("the rotating channels must start at an even channel")
    if norm is not None and norm[0].shape != (d,):
        raise ValueError(f"the norm weight must be [{d}], got shape {tuple(norm[0].shape)}")
    if qat == "fp8" and (nope % QAT_KV_FP8_BLOCK or not 0 <= nope <= d):
        raise ValueError(f"nope ({nope}) must be a multiple of {QAT_KV_FP8_BLOCK} within {d}")
    if qat == "fp4" and (d & (d - 1) or d % QAT_INDEXER_FP4_BLOCK):
        raise ValueError(f"the Hadamard needs a power-of-two D, a multiple of "
                         f"{QAT_INDEXER_FP4_BLOCK}, got {d}")  # fmt: skip
    if x.stride(-1) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("x, cos and sin must have contiguous last dims (and equal strides)")


def _launch(x, cos, sin, norm, qat, nope, out, stride_a, stride_b, slots, rows) -> None:
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # a view: split projections stay uncopied
    n, heads, d = x3.shape
    num_rows = n * heads
    if num_rows == 0:
        return
    if qat == "fp8" and nope == 0:
        qat = None
    block_rows = min(BLOCK_ROWS, next_power_of_2(num_rows))
    weight = norm[0] if norm is not None else None
    scatter = slots is not None
    _cache_rows_kernel[(cdiv(num_rows, block_rows),)](
        x3, x3 if weight is None else weight, cos, sin, out,
        slots if scatter else x3, rows if scatter else x3,
        num_rows, heads, d, cos.shape[1], norm[1] if norm is not None else 0.0,
        _hadamard_entry(d) if qat == "fp4" else 0.0,
        x3.stride(0), x3.stride(1), cos.stride(0), stride_a, stride_b,
        BLOCK_ROWS=block_rows, BLOCK_D=next_power_of_2(d),
        LOG2_D=next_power_of_2(d).bit_length() - 1, NORM=norm is not None,
        HAS_WEIGHT=weight is not None, ROUND_X=x.dtype == torch.bfloat16,
        QAT=QAT_CODES[qat], SCATTER=scatter, ROUND_OUT=out.dtype == torch.bfloat16,
        **pdl_launch(x3),
    )  # fmt: skip


def write_cache_rows(dst: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                     x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     norm: Norm | None, qat: str | None = None, nope: int = 0) -> None:
    """dst[slots[n], rows[n]] = the finished row of x[n] (see the module docstring)."""
    _check(x, cos, sin, norm, qat, nope)
    if x.dim() != 2 or dst.dim() != 3 or dst.shape[2] != x.shape[1]:
        raise ValueError(f"write_cache_rows wants x [N, D] and dst [S, L, D], got "
                         f"{tuple(x.shape)} and {tuple(dst.shape)}")  # fmt: skip
    if slots.shape != (x.shape[0],) or rows.shape != (x.shape[0],):
        raise ValueError(f"slots and rows must be [{x.shape[0]}]")
    if not use_triton(x):
        dst[slots, rows] = cache_rows_reference(x, cos, sin, norm, qat, nope).to(dst.dtype)
        return
    if dst.dtype not in (torch.bfloat16, torch.float32) or dst.stride(2) != 1:
        raise ValueError(f"dst must be bf16 or fp32 with a contiguous last dim, got {dst.dtype}")
    if slots.dtype != torch.int64 or rows.dtype != torch.int64:
        raise ValueError("slots and rows must be int64")
    _launch(x, cos, sin, norm, qat, nope, dst, dst.stride(0), dst.stride(1), slots, rows)


def finish_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                norm: Norm | None = None, qat: str | None = None, nope: int = 0) -> torch.Tensor:
    """The finished rows of x [N, Hx, D] as a new fp32 tensor (the indexer's queries)."""
    _check(x, cos, sin, norm, qat, nope)
    if x.dim() != 3:
        raise ValueError(f"finish_rows wants x [N, Hx, D], got {tuple(x.shape)}")
    if not use_triton(x):
        return cache_rows_reference(x, cos, sin, norm, qat, nope).float()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _launch(x, cos, sin, norm, qat, nope, out, out.stride(0), out.stride(1), None, None)
    return out
