"""QAT's FP4 (e2m1) round trip of the indexer's queries and keys (engine.attention.
fp4_roundtrip, blocks of 32), one kernel instead of ~14 torch ones (abs, amax, clamp, div,
log2, ceil, exp2, div, clamp, abs, bucketize, index, sign, mul, mul, cast).

Per block of BLOCK channels of a row:

  amax  = max(max |x_block|, 1e-4)
  scale = 2^ceil(log2(amax / 6))            (the smallest 2^k with amax <= 6 * 2^k)
  y     = clamp(x / scale, +-6)
  out   = sign(y) * nearest e2m1 value of |y| (grid 0, .5, 1, 1.5, 2, 3, 4, 6; an exact
          midpoint goes to the lower value, the reference's bucketize rule) * scale

Exact as the FP8 kernel (engine/kernels/_device_math.py e2m1_qat): the scale from amax's
bits, x / scale an exact multiply by 2^-k, the grid value a sum of comparisons against the
midpoints, q * scale exact.

Shapes: x [..., D] fp32 or bf16, contiguous, D a multiple of BLOCK. out like x.
"""

from __future__ import annotations

import functools

import torch

from engine.attention import _FP4_GRID, FP4_E2M1_MAX, _pow2_scale
from engine.config import QAT_INDEXER_FP4_BLOCK
from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import e2m1_qat, wait_for_inputs
from engine.kernels._triton import jit

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)


@jit
def _fp4_roundtrip_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    tl.store(out_ptr + offs, e2m1_qat(x, tl.max(tl.abs(x), axis=0)).to(out_ptr.dtype.element_ty))


@functools.cache
def _fp4_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(_FP4_GRID, device=device)
    return grid, (grid[1:] + grid[:-1]) / 2


def fp4_roundtrip_reference(x: torch.Tensor, block: int = QAT_INDEXER_FP4_BLOCK) -> torch.Tensor:
    """engine.attention.fp4_roundtrip with its e2m1 grid made once per device: the model's
    builds it with torch.tensor on every call, a host-to-device copy that a CUDA graph
    cannot capture (the warm-up before a capture fills this cache)."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = _pow2_scale(xb, FP4_E2M1_MAX)
    y = (xb / scale).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    grid, mids = _fp4_tables(str(x.device))
    q = grid[torch.bucketize(y.abs(), mids)] * y.sign()
    return (q * scale).flatten(-2).to(x.dtype)


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
        _fp4_roundtrip_kernel[(x.numel() // block,)](x, out, BLOCK=block,
                                                           **pdl_launch(x))
    return out
