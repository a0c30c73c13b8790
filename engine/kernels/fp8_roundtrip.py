"""QAT's FP8 round trip of a row's first `nope` channels (engine.attention.fp8_roundtrip in
blocks of 64), the other channels copied: the decode step's kv and compressed entries under
config.qat, one kernel instead of ~14 torch ones (abs, amax, clamp, div, log2, ceil, exp2,
div, clamp, two casts, mul, cast, cat).

Per row x[n] (D channels), for each block of BLOCK channels below `nope`:

  amax  = max(max |x_block|, 1e-4)
  scale = 2^ceil(log2(amax / 448))          (E8M0: the smallest 2^k with amax <= 448 * 2^k)
  out   = e4m3(clamp(x / scale, +-448)) * scale       (e4m3: round to nearest even)
  channels >= nope: out = x

No float op here can round differently from the reference's: the scale comes from amax's
exponent and mantissa bits (amax <= 448 * 2^k <=> k >= e - 8 + [mantissa > 1.75]), dividing
by it is an exact multiply by 2^-k, the e4m3 rounding is integer arithmetic on the fp32 bits
(per-element shifts: 20 dropped bits for normals, 21..23 in e4m3's subnormal range, then
the two cases below 2^-9), and q * scale has at most 4 significant bits, exact in bf16. (The
reference's log2 can round up to an integer k for an amax within an ulp above 448 * 2^k; the
exact rule here then picks 2^(k+1): measure zero for real activations.)

Shapes: x [N, D] bf16 or fp32, contiguous last dim; nope a multiple of BLOCK. out like x.
"""

from __future__ import annotations

import torch

from engine.attention import fp8_roundtrip as fp8_roundtrip_reference
from engine.config import QAT_KV_FP8_BLOCK
from engine.kernels import use_triton
from engine.kernels._triton import cdiv, jit

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)


@jit
def _fp8_roundtrip_kernel(
    x_ptr, out_ptr, dim, nope, stride_x, stride_o,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + n * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if tl.program_id(1) * BLOCK < nope:
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4)
        bits = amax.to(tl.int32, bitcast=True)
        k = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        a = tl.abs(y).to(tl.int32, bitcast=True)
        e = ((a >> 23) & 0xFF) - 127
        drop = 20 + tl.minimum(tl.maximum(-6 - e, 0), 3)  # 20 normal, 21..23 subnormal
        lsb = ((a | 0x800000) >> drop) & 1  # the kept value's parity (implicit bit included)
        r = (a + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)
        q = r.to(tl.float32, bitcast=True)
        tiny = 0.001953125  # 2^-9, e4m3's smallest subnormal
        q = tl.where(e == -10, tl.where(tl.abs(y) > 0.0009765625, tiny, 0.0), q)  # 2^-10 ties to 0
        q = tl.where(e < -10, 0.0, q)
        q = tl.where(y < 0, -q, q)
        x = tl.where(offs < nope, q * scale, x)
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
            rows, out, rows.shape[1], nope, rows.stride(0), out.stride(0), BLOCK=block)
    return out.view(x.shape)
