"""QAT's FP8 round trip of a row's first `nope` channels (engine.attention.fp8_roundtrip in
blocks of 64), the other channels copied: the decode step's kv and compressed entries under
config.qat, one kernel instead of ~14 torch ones (abs, amax, clamp, div, log2, ceil, exp2,
div, clamp, two casts, mul, cast, cat).

Per row x[n] (D channels), for each block of BLOCK channels below `nope`:

  amax  = max(max |x_block|, 1e-4)
  scale = 2^ceil(log2(amax / 448))          (E8M0: the smallest 2^k with amax <= 448 * 2^k)
  out   = e4m3(clamp(x / scale, +-448)) * scale       (e4m3: round to nearest even)
  channels >= nope: out = x

No float op here can round differently from the reference's (engine/kernels/_device_math.py
e4m3_qat: the scale from amax's bits, the e4m3 rounding in integer arithmetic on the fp32
bits: 20 dropped bits for normals, 21..23 in e4m3's subnormal range, then the two cases
below 2^-9); q * scale has at most 4 significant bits, exact in bf16.

Shapes: x [N, D] bf16 or fp32, contiguous last dim; nope a multiple of BLOCK. out like x.
"""

from __future__ import annotations

import torch

from engine.attention import fp8_roundtrip as fp8_roundtrip_reference
from engine.config import QAT_KV_FP8_BLOCK
from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import e4m3_qat, wait_for_inputs
from engine.kernels._triton import cdiv, jit

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)


@jit
def _fp8_roundtrip_kernel(
    x_ptr, out_ptr, dim, nope, stride_x, stride_o,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + n * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if tl.program_id(1) * BLOCK < nope:
        x = tl.where(offs < nope, e4m3_qat(x, tl.max(tl.abs(x), axis=0)), x)
    tl.store(out_ptr + n * stride_o + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def fp8_roundtrip_prefix(x: torch.Tensor, nope: int, block: int = QAT_KV_FP8_BLOCK) -> torch.Tensor:
    """cat([fp8_roundtrip(x[..., :nope]), x[..., nope:]], -1) as a new tensor."""
    if not use_triton(x):
        return torch.cat([fp8_roundtrip_reference(x[..., :nope], block), x[..., nope:]], -1)
    if x.dtype not in (torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        raise ValueError(f"x must be bf16 or fp32 with a contiguous last dim, got {x.dtype}")
    if nope % block or not 0 <= nope <= x.shape[-1]:
        raise ValueError(f"nope ({nope}) must be a multiple of {block} within {x.shape[-1]}")
    rows = x.reshape(-1, x.shape[-1])
    out = _empty(rows.shape, x.dtype, x.device)
    if rows.numel():
        _fp8_roundtrip_kernel[(rows.shape[0], cdiv(rows.shape[1], block))](
            rows, out, rows.shape[1], nope, rows.stride(0), out.stride(0), BLOCK=block,
            **pdl_launch(x))
    return out.view(x.shape)
