"""GGML block-format linear layers (ds4's GGUF): y = x @ W.T with W kept as Q8_0 / Q2_K /
IQ2_XXS blocks and decoded in registers, never in memory.

Decode is memory bound: a token reads each routed expert's 2.06-2.6 bits per weight once,
so the kernel reads the raw blocks (engine.formats has the layouts) and nothing else.

Shapes:

    x      [M, K]            bf16 (the model) | fp16 | f32 (the tiny test model), M <= 16
    blocks [N, K / B * S]    uint8 GGML blocks, row-major (B values in S bytes per block:
                             Q8_0 32 in 34, Q2_K 256 in 84, IQ2_XXS 256 in 66)
    grid   [256 * 8]         f32, IQ2_XXS magnitudes; signs [128] uint8 (the gguf package's
                             tables, engine.formats._iq2_tables)
    out    [M, N]            x.dtype

Kernel (`_ggml_linear_kernel`): one program owns BLOCK_N weight rows and one slice of the K
axis. It walks the slice 32 values at a time (one Q8_0 block, a quarter Q2_K block's two
16-value groups, one IQ2_XXS sub-block of 4 x 8 values: every format's scales are constant
over such a chunk or over its two halves), decodes the [BLOCK_N, 32] tile to fp32 in
registers exactly as `formats.dequantize_*` does, rounds it to x's dtype (what the reference
path `F.linear(x, dense_weight(x.dtype))` multiplies), and accumulates in fp32:
  - USE_DOT (M > 1): acc[BLOCK_N, BLOCK_M] += dot(w_tile, x_tile^T), batch padded to 16;
  - FMA (M = 1): acc[BLOCK_N, 32] += w * x, reduced once at the end.
One format switch (FMT, a constexpr) picks the decoder; the rest is shared.

Split-K: an expert's w1 (2048 rows of 4096) gives 64 row tiles of 32, too few for 132 SMs,
so K is also split over SPLIT_K programs whose fp32 partials [SPLIT_K, M, N] are summed in a
fixed order (deterministic: the greedy-equality tests rely on the same bits run to run);
unsplit, the kernel writes x.dtype directly.

Prefill (M > 16) and the reference mode take `F.linear(x, dequantize_ggml(W))`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine import formats as fm
from engine.formats import WeightFormat
from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import wait_for_inputs
from engine.kernels._triton import LazyModule

triton = tl = None  # imported at the first launch (`_lazy.materialize`)

CHUNK = 32             # values decoded per step (not tuned: the formats' scale granularity)
MAX_DECODE_ROWS = 16   # M above this is prefill: decode the weight once, then matmul
FMT_IDS = {WeightFormat.Q8_0: 0, WeightFormat.Q2_K: 1, WeightFormat.IQ2_XXS: 2}

_lazy = LazyModule(globals())  # Triton jitted at the first launch (engine/kernels/_triton.py)


# -- kernels -----------------------------------------------------------------------------


@_lazy.mark
def _f16_at(ptr):
    """The little-endian f16 at byte pointers `ptr` (any alignment) -> fp32."""
    lo = tl.load(ptr).to(tl.int32)
    hi = tl.load(ptr + 1).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@_lazy.mark
def _decode_chunk(row_ptr, c, offs_j, grid_ptr, signs_ptr, FMT: tl.constexpr):
    """Values c*32 .. c*32+31 of the rows at byte pointers row_ptr [BLOCK_N] -> fp32 [BLOCK_N, 32]."""
    if FMT == 0:  # Q8_0: block c = f16 d, 32 int8
        base = row_ptr + c * 34
        d = _f16_at(base)
        q = tl.load(base[:, None] + 2 + offs_j[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * d[:, None]
    elif FMT == 1:  # Q2_K: values v0 .. v0+31 of block c // 8
        base = row_ptr + (c // 8) * 84
        v0 = (c % 8) * 32
        h = v0 // 128
        s = (v0 % 128) // 32
        qb = tl.load(base[:, None] + 16 + 32 * h + offs_j[None, :]).to(tl.int32)
        q = ((qb >> (2 * s)) & 3).to(tl.float32)
        sc = tl.load(base[:, None] + v0 // 16 + offs_j[None, :] // 16).to(tl.int32)
        d = _f16_at(base + 80)
        dmin = _f16_at(base + 82)
        dl = d[:, None] * (sc & 0xF).to(tl.float32)
        ml = dmin[:, None] * (sc >> 4).to(tl.float32)
        w = dl * q - ml
    else:  # IQ2_XXS: sub-block c % 8 of block c // 8
        base = row_ptr + (c // 8) * 66
        d = _f16_at(base)
        sub = base + 2 + (c % 8) * 8
        group = offs_j // 8
        idx = tl.load(sub[:, None] + group[None, :]).to(tl.int32)  # [BLOCK_N, 32]
        aux = tl.load(sub + 4).to(tl.uint32) | (tl.load(sub + 5).to(tl.uint32) << 8) | (
            tl.load(sub + 6).to(tl.uint32) << 16) | (tl.load(sub + 7).to(tl.uint32) << 24)
        db = d * (0.5 + (aux >> 28).to(tl.float32)) * 0.25
        sign_idx = ((aux[:, None] >> (7 * group[None, :]).to(tl.uint32)) & 0x7F).to(tl.int32)
        sbyte = tl.load(signs_ptr + sign_idx).to(tl.int32)
        neg = (sbyte >> (offs_j[None, :] % 8)) & 1
        g = tl.load(grid_ptr + idx * 8 + offs_j[None, :] % 8)
        w = db[:, None] * g * tl.where(neg == 0, 1.0, -1.0)
    return w


@_lazy.mark
def _ggml_linear_kernel(
    # pointers
    x_ptr,      # [M, K] x.dtype
    w_ptr,      # [N, row_bytes] uint8 GGML blocks
    grid_ptr,   # [256 * 8] f32 (IQ2_XXS only)
    signs_ptr,  # [128] uint8 (IQ2_XXS only)
    out_ptr,    # [SPLIT_K, M, N] fp32 partials ([1, M, N] x.dtype when unsplit)
    # sizes
    M, N, chunks_per_split, num_chunks,
    # strides
    stride_xm, stride_wn, stride_os, stride_om,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    FMT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamp instead of masking every byte load: rows past N decode row N-1, never stored
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # int64: 129280 rows x 4352 bytes > 2^31
    row_ptr = w_ptr + rows * stride_wn
    offs_j = tl.arange(0, 32)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, num_chunks)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
    for c in range(c_start, c_end):
        # the reference multiplies the weight rounded to x's dtype
        w = _decode_chunk(row_ptr, c, offs_j, grid_ptr, signs_ptr, FMT).to(x_ptr.dtype.element_ty)
        k = c * 32 + offs_j
        if USE_DOT:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=mask_m[None, :],
                         other=0.0)  # [32, BLOCK_M]
            if DOT_F32:
                acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w, xt)
        else:
            xv = tl.load(x_ptr + k).to(tl.float32)
            acc2 += w.to(tl.float32) * xv[None, :]
    mask_n = offs_n < N
    out = out_ptr + pid_k.to(tl.int64) * stride_os
    if USE_DOT:
        tl.store(out + offs_m[None, :] * stride_om + offs_n[:, None], acc,
                 mask=mask_n[:, None] & mask_m[None, :])
    else:
        tl.store(out + offs_n, tl.sum(acc2, axis=1), mask=mask_n)


# -- launcher ----------------------------------------------------------------------------

_pinned: dict[str, int] = {}


def pin_config(block_n: int | None = None, split_k: int | None = None) -> None:
    """Force BLOCK_N / SPLIT_K (tests reach the split path at small shapes); None: heuristics."""
    _pinned.clear()
    if block_n is not None:
        _pinned["block_n"] = block_n
    if split_k is not None:
        _pinned["split_k"] = split_k


@functools.cache
def _num_sms(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4


def _config(m: int, n: int, num_chunks: int, device: str) -> tuple[int, int]:
    block_n = _pinned.get("block_n", 32)
    tiles = -(-n // block_n)
    # enough programs for two waves over the SMs, each still walking >= 8 chunks
    split = max(1, min(num_chunks // 8, -(-2 * _num_sms(device) // tiles)))
    return block_n, _pinned.get("split_k", split)


def ggml_linear(x: torch.Tensor, blocks: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """x [..., K] @ W.T for W the GGML `fmt` blocks [N, K / B * S] -> [..., N] in x.dtype."""
    if fmt not in FMT_IDS:
        raise ValueError(f"{fmt} is no GGML block format")
    n = blocks.shape[0]
    k = x.shape[-1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != fm.ggml_row_bytes(fmt, k):
        raise ValueError(f"{fmt.value} blocks for K={k} must be uint8 [N, "
                         f"{fm.ggml_row_bytes(fmt, k)}], got {blocks.dtype} {list(blocks.shape)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not use_triton(x) or m > MAX_DECODE_ROWS or m == 0:
        return F.linear(x, fm.dequantize_ggml(fmt, blocks, x.dtype))
    _lazy.materialize()
    if blocks.stride(1) != 1:
        raise ValueError("GGML blocks must be contiguous along each row")
    x2 = x2.contiguous()
    num_chunks = k // CHUNK
    block_n, split = _config(m, n, num_chunks, str(x.device))
    per_split = -(-num_chunks // split)
    split = -(-num_chunks // per_split)  # no empty slice
    grid_t, signs_t = fm._iq2_tables(str(x.device))
    # unsplit, the kernel stores x.dtype itself (tl.store rounds); split, fp32 partials
    partial = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32,
                          device=x.device)
    use_dot = m > 1
    _ggml_linear_kernel[(triton.cdiv(n, block_n), split)](
        x2, blocks, grid_t, signs_t, partial,
        m, n, per_split, num_chunks,
        x2.stride(0), blocks.stride(0), partial.stride(0), partial.stride(1),
        BLOCK_M=16 if use_dot else 1, BLOCK_N=block_n, USE_DOT=use_dot,
        DOT_F32=x.dtype == torch.float32 or not x.is_cuda, FMT=FMT_IDS[fmt], **pdl_launch(x),
    )
    out = partial[0] if split == 1 else partial.sum(0).to(x.dtype)  # fixed order over splits
    return out.view(*x.shape[:-1], n)


def ggml_linear_grouped(x: torch.Tensor, blocks: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """x [M, G, K], blocks [G*N, K / B * S] -> [M, G, N]: group g multiplies rows g*N..(g+1)*N
    (attention's `wo_a`, fp8_linear_grouped's contract). One GEMV per group on row slices of
    the blocks (views: each group's rows are contiguous)."""
    if x.dim() != 3:
        raise ValueError(f"grouped x must be [M, G, K], got {list(x.shape)}")
    groups = x.shape[1]
    if blocks.shape[0] % groups:
        raise ValueError(f"{blocks.shape[0]} weight rows do not split into {groups} groups")
    n = blocks.shape[0] // groups
    return torch.stack([ggml_linear(x[:, g], blocks[g * n : (g + 1) * n], fmt)
                        for g in range(groups)], dim=1)
