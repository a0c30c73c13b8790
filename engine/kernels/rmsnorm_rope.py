"""RMSNorm fused with the partial interleaved RoPE that follows it (attention's q and kv), the
RoPE alone (the inverse rotation of the attention output), and the RMSNorm alone (the
attn_norm / ffn_norm / final norm over H = 4096: one kernel instead of ~7 torch ones).

Per head row x[n, h] (D channels, the last R = 2 * cos.shape[-1] of them rotate):

  rmsnorm_rope:  y = x * rsqrt(mean(x^2) + eps) (* weight), rounded to x's dtype, then
                 apply_rope(y, cos[n], sin[n])                        (engine/rope.py)
  rope:          apply_rope(x, cos[n], sin[n], inverse)

  q:  [B, 64, 512] per-head norm without weight (Attention.forward's q), then RoPE
  kv: [B, 512] kv_norm (with weight), then RoPE; QAT's FP8 rounding stays with the caller
  out: [B, 64, 512] inverse RoPE by the query position

Why fuse: unfused, each is ~8 elementwise torch kernels (float, square, mean, rsqrt, mul,
cast, the rope's slices / stack / cat) on a few hundred KB: launch-bound, ≈ 15 us a layer in
a graph where one kernel takes ≈ 2 us.

Algorithm: one program per (token, block of heads) loads its [BLOCK_H, D] rows once for the
sums of squares and the unrotated channels, and the rotating channels again as even / odd
[BLOCK_H, R/2] tiles (from L1), so the interleaved pairs need no shuffles. The normed values
are rounded to bf16 before rotating exactly as the reference rounds them (round to nearest
even in integer arithmetic: the CPU interpreter truncates float casts).

Shapes: N tokens, Hx heads (1 for kv), D head dim, R rope dims.
    x  [N, Hx, D] or [N, D]   bf16 (fp32 in tests)     weight [D] or None
    cos, sin [N, R/2] fp32                             out: x's shape and dtype
"""

from __future__ import annotations

import torch

from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import round_bf16, wait_for_inputs
from engine.kernels._triton import cdiv, jit, next_power_of_2, store_dtype
from engine.rope import apply_rope

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

BLOCK_H = 8  # 8 heads x 512 fp32 = 16 KB a program; q (64 heads) = 8 programs per token


def rmsnorm_rope_reference(x, weight, cos, sin, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return apply_rope(y.to(x.dtype), cos, sin)


def rope_reference(x, cos, sin, inverse: bool = False) -> torch.Tensor:
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return apply_rope(x, cos, sin, inverse=inverse)


@jit
def _rmsnorm_rope_kernel(
    x_ptr,  # [N, Hx, D]
    w_ptr,  # [D] norm weight (x_ptr when HAS_WEIGHT is False: never read)
    cos_ptr,  # [N, R/2] f32
    sin_ptr,  # [N, R/2] f32
    out_ptr,  # [N, Hx, D]
    num_heads,
    head_dim,
    rope_half,
    eps,
    stride_x_n,
    stride_x_h,
    stride_c_n,
    stride_o_n,
    stride_o_h,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    INVERSE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0).to(tl.int64)  # int64: token * stride passes 2^31 in long prefills
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask = offs_h < num_heads
    nope = head_dim - 2 * rope_half
    rows_x = x_ptr + pid_n * stride_x_n + offs_h[:, None] * stride_x_h
    rows_o = out_ptr + pid_n * stride_o_n + offs_h[:, None] * stride_o_h

    x = tl.load(rows_x + offs_d[None, :], mask=h_mask[:, None] & (offs_d < head_dim)[None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    even = nope + 2 * offs_r  # [BLOCK_R] channel of each pair's first element
    pair_mask = h_mask[:, None] & (offs_r < rope_half)[None, :]
    a = tl.load(rows_x + even[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    b = tl.load(rows_x + even[None, :] + 1, mask=pair_mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / head_dim + eps)  # [BLOCK_H]
        x = x * rstd[:, None]
        a = a * rstd[:, None]
        b = b * rstd[:, None]
        if HAS_WEIGHT:
            x = x * tl.load(w_ptr + offs_d, mask=offs_d < head_dim, other=0.0).to(tl.float32)
            a = a * tl.load(w_ptr + even, mask=offs_r < rope_half, other=0.0).to(tl.float32)
            b = b * tl.load(w_ptr + even + 1, mask=offs_r < rope_half, other=0.0).to(tl.float32)
        if ROUND_BF16:  # the reference rotates the bf16 normed row
            a = round_bf16(a)
            b = round_bf16(b)
    tl.store(rows_o + offs_d[None, :], x.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & (offs_d < nope)[None, :])  # fmt: skip

    cos = tl.load(cos_ptr + pid_n * stride_c_n + offs_r, mask=offs_r < rope_half, other=0.0)
    sin = tl.load(sin_ptr + pid_n * stride_c_n + offs_r, mask=offs_r < rope_half, other=0.0)
    if INVERSE:
        sin = -sin
    rot_a = a * cos[None, :] - b * sin[None, :]
    rot_b = a * sin[None, :] + b * cos[None, :]
    tl.store(rows_o + even[None, :], rot_a.to(out_ptr.dtype.element_ty), mask=pair_mask)
    tl.store(rows_o + even[None, :] + 1, rot_b.to(out_ptr.dtype.element_ty), mask=pair_mask)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(x, weight, cos, sin, eps: float, norm: bool, inverse: bool) -> torch.Tensor:
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() not in (2, 3):
        raise ValueError(f"x must be bf16 or fp32 [N, D] or [N, Hx, D], got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    N, Hx, D = x3.shape
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != N or 2 * cos.shape[1] > D:
        raise ValueError(f"cos and sin must be [{N}, R/2] with R <= {D}, got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")  # fmt: skip
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"weight must be [{D}], got shape {tuple(weight.shape)}")
    if x3.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("x, cos and sin must have contiguous last dims (and equal strides)")
    out = _empty((N, Hx, D), store_dtype(x.dtype, x.device), x.device)
    if N and Hx:
        block_h = min(BLOCK_H, next_power_of_2(Hx))
        _rmsnorm_rope_kernel[(N, cdiv(Hx, block_h))](
            x3, x3 if weight is None else weight, cos, sin, out,
            Hx, D, cos.shape[1], eps,
            x3.stride(0), x3.stride(1), cos.stride(0), out.stride(0), out.stride(1),
            BLOCK_H=block_h, BLOCK_D=next_power_of_2(D), BLOCK_R=next_power_of_2(cos.shape[1]),
            NORM=norm, HAS_WEIGHT=weight is not None, INVERSE=inverse,
            ROUND_BF16=x.dtype == torch.bfloat16, **pdl_launch(x),
        )  # fmt: skip
    return out.to(x.dtype).view(x.shape)


def rmsnorm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """RMSNorm of each D-row (times weight if given), rounded to x's dtype, then RoPE."""
    if not use_triton(x):
        return rmsnorm_rope_reference(x, weight, cos, sin, eps)
    return _launch(x, weight, cos, sin, eps, norm=True, inverse=False)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """engine.rope.apply_rope with cos/sin [N, R/2] shared by x's heads."""
    if not use_triton(x):
        return rope_reference(x, cos, sin, inverse)
    return _launch(x, None, cos, sin, 0.0, norm=False, inverse=inverse)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """engine.attention.RMSNorm.forward over x's last dim (any leading shape)."""
    if not use_triton(x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        return (y * weight.float()).to(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    no_rope = rows.new_empty((rows.shape[0], 0), dtype=torch.float32)
    return _launch(rows, weight, no_rope, no_rope, eps, norm=True, inverse=False).view(x.shape)
