"""QAT's FP4 (e2m1) round trip of the indexer's queries and keys (engine.attention.
fp4_roundtrip, blocks of 32), one kernel instead of ~14 torch ones (abs, amax, clamp, div,
log2, ceil, exp2, div, clamp, abs, bucketize, index, sign, mul, mul, cast).

Per block of BLOCK channels of a row:

  amax  = max(max |x_block|, 1e-4)
  scale = 2^ceil(log2(amax / 6))            (the smallest 2^k with amax <= 6 * 2^k)
  y     = clamp(x / scale, +-6)
  out   = sign(y) * nearest e2m1 value of |y| (grid 0, .5, 1, 1.5, 2, 3, 4, 6; an exact
          midpoint goes to the lower value, the reference's bucketize rule) * scale

Exact as the FP8 kernel (engine/kernels/fp8_roundtrip.py): the scale from amax's bits
(amax <= 6 * 2^k <=> k >= e - 2 + [mantissa > 1.5]), x / scale an exact multiply by 2^-k,
the grid value a sum of comparisons against the midpoints, q * scale exact.

Shapes: x [..., D] fp32 or bf16, contiguous, D a multiple of BLOCK. out like x.
"""

from __future__ import annotations

import torch

from engine.attention import fp4_roundtrip as fp4_roundtrip_reference
from engine.config import QAT_INDEXER_FP4_BLOCK
from engine.kernels import use_triton
from engine.kernels._triton import jit

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)


@jit
def _fp4_roundtrip_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4)
    bits = amax.to(tl.int32, bitcast=True)
    k = ((bits >> 23) & 0xFF) - 127 - 2 + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    y = tl.minimum(tl.maximum(x * inv, -6.0), 6.0)
    v = tl.abs(y)
    q = 0.5 * ((v > 0.25).to(tl.float32) + (v > 0.75).to(tl.float32)
               + (v > 1.25).to(tl.float32) + (v > 1.75).to(tl.float32))
    q += (v > 2.5).to(tl.float32) + (v > 3.5).to(tl.float32) + 2.0 * (v > 5.0).to(tl.float32)
    q = tl.where(y < 0, -q, q)
    tl.store(out_ptr + offs, (q * scale).to(out_ptr.dtype.element_ty))


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def fp4_roundtrip(x: torch.Tensor, block: int = QAT_INDEXER_FP4_BLOCK) -> torch.Tensor:
    """engine.attention.fp4_roundtrip(x, block) as a new tensor."""
    if not use_triton(x):
        return fp4_roundtrip_reference(x, block)
    if x.dtype not in (torch.bfloat16, torch.float32) or not x.is_contiguous():
        raise ValueError(f"x must be contiguous bf16 or fp32, got {x.dtype}")
    if x.shape[-1] % block:
        raise ValueError(f"the last dim ({x.shape[-1]}) must be a multiple of {block}")
    out = _empty(x.shape, x.dtype, x.device)
    if x.numel():
        _fp4_roundtrip_kernel[(x.numel() // block,)](x, out, BLOCK=block)
    return out
