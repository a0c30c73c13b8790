"""The shared expert's SwiGLU on the fused w1|w3 output: h = silu(g) * u, rounded to x's dtype.

    gu [N, 2I] (g = gu[:, :I], u = gu[:, I:]; bf16, fp32 in tests)   ->   h [N, I] gu's dtype

as engine.moe.Expert.hidden computes it for the shared expert (no clamp, no routing weight):
g and u are each upcast to fp32, silu(g) * u in fp32, rounded once. On torch that is five
launches (two upcasts, silu, mul, the cast back) on 16 KB; here one.

Algorithm: one program per (token, block of I); silu(g) = g * sigmoid(g) in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import wait_for_inputs
from engine.kernels._triton import cdiv, jit, store_dtype

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

BLOCK = 1024


def swiglu_reference(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(gu.dtype)


@jit
def _swiglu_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_out, BLOCK: tl.constexpr,
                   PDL: tl.constexpr = False):
    wait_for_inputs(PDL)
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gu_ptr + n * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + n * stride_gu + inter + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(out_ptr + n * stride_out + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """gu [N, 2I] -> silu(gu[:, :I]) * gu[:, I:] [N, I] in gu's dtype (fp32 math)."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"swiglu: gu must be [N, 2I], got {tuple(gu.shape)}")
    if not use_triton(gu):
        return swiglu_reference(gu)
    if gu.stride(1) != 1:
        raise ValueError("swiglu: gu needs unit stride along its last dim")
    N, inter = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(N, inter, dtype=store_dtype(gu.dtype, gu.device), device=gu.device)
    if N and inter:
        _swiglu_kernel[(N, cdiv(inter, BLOCK))](gu, out, inter, gu.stride(0), out.stride(0),
                                               BLOCK=BLOCK, **pdl_launch(gu))
    return out.to(gu.dtype)
