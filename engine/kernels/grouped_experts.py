"""Routed experts for prefill: tokens grouped by expert, one tensor-core GEMM tile per group.

The decode kernels (engine/kernels/routed_experts.py) run one GEMV per (token, expert) pair,
which reads an expert's weights once per pair: right for a few tokens, but a 2,048-token
prefill chunk has 12,288 pairs over 256 experts, ~48 per expert. Here each expert's weights
are read (and dequantised, in registers) once per BLOCK_M of its tokens and meet them in
`tl.dot`. The reference this replaces (engine.moe's loop) dequantised every used expert to a
dense bf16 copy in memory, one at a time, with a host sync per expert.

N tokens, K experts each, P = N * K pairs p = t * K + k, E experts, H hidden, I intermediate.

  xs        [N, PW, H/PW] x value-major: xs[t, j, w] = x[t, w * PW + j] (PW values a word:
                   16 INT2, 8 FP4, 1 DENSE), so value j of a block of words meets one
                   contiguous slice of x in a tl.dot, decoded with no reshape
  plan (torch, on the device, no host sync)
    order     [P]  pair ids sorted by expert (stable); pairs with an id outside [0, E) last
    tile_*    [T]  T = cdiv(P, BLOCK_M) + min(E, P) >= the tiles needed: tile t covers rows
                   tile_row[t] .. + tile_len[t] of `order`, all of expert tile_expert[t]
                   (tile_len 0: an unused program, it returns at once)
  _gate_up_kernel  grid (T, cdiv(I, BLOCK_N)): g = x W1_e^T, u = x W3_e^T for the tile's
                   tokens, rounded to the activation dtype; u clamped to [-limit, limit], g
                   to <= limit; h = silu(g) * u * weight rounded -> h [P, PW, I/PW] in
                   sorted order, value-major like xs
  _down_kernel     grid (T, cdiv(H, BLOCK_N)): part_p = round(h_p W2_e^T) -> parts [P, H]
                   at the pair's own row p
  y_t = sum_k parts[t * K + k] in fp32 (torch), pairs never written stay 0

Rounding points are engine.moe's reference: the weight dequantised exactly and rounded to the
activation dtype (`dense_weight(x.dtype)`), products summed in fp32, g/u/h and each expert's
output rounded to the activation dtype, the K outputs summed in fp32. Only the order of the
fp32 sums differs (tests/engine/kernels/test_grouped_experts.py states the tolerance).

Weights are the decode kernels' stacks (engine.moe.MoE.stack_experts); formats:

| FORMAT | words `w`                         | scale `s`                    | zero `z`            |
|--------|-----------------------------------|------------------------------|---------------------|
| INT2   | int32 [E, R, C/16], value j at bits 2j..2j+1 | fp16 [E, R, C/64] | uint8 [E, R, C/128], group g in nibble g % 2 |
| FP4    | int32 [E, R, C/8], e2m1 code j at bits 4j..4j+3 | E8M0 uint8 [E, R, C/32] | -          |
| DENSE  | [E, R, C]                         | -                            | -                   |

Dequantisation here converts integers to floats (the GEMV's conversion-free trick needs an
FMA per weight and activation; a tile's weights are decoded once and reused BLOCK_M times).
"""

from __future__ import annotations

import os

import torch

from engine.kernels import use_triton
from engine.kernels.routed_experts import (
    _FORMAT_CODE,
    _PER_WORD,
    _TL_DTYPE,
    FMT_DENSE,
    FMT_INT2,
    ExpertStack,
    check_inputs,
    kernel_views,
    routed_experts_reference,
)

try:  # optional: the base install has no Triton and takes the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without the test extra
    triton = None

CONFIG_ENV = "DSML_GROUPED_EXPERTS_CONFIG"


# -- kernels -------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _word_scales(s_ptr, z_ptr, rows, row_mask, offs_w, n_words,
                     stride_s_row, stride_z_row, FORMAT: tl.constexpr):
        """Per word of W[rows, words offs_w]: (scale, zero * scale) fp32 [R, BLOCK_W], each
        word loading its own group's (4 words a group, so 4 lanes share one; L1 hits)."""
        mask = row_mask[:, None] & (offs_w < n_words)[None, :]
        if FORMAT == 2:  # INT2: fp16 scale per 4 words, 4-bit zero (group g: nibble g % 2)
            g = offs_w // 4
            s = tl.load(s_ptr + rows[:, None] * stride_s_row + g[None, :], mask=mask,
                        other=0).to(tl.float32)
            zb = tl.load(z_ptr + rows[:, None] * stride_z_row + (g // 2)[None, :], mask=mask,
                         other=0).to(tl.int32)
            z = ((zb >> ((g % 2) * 4)[None, :]) & 15).to(tl.float32)
            return s, z * s
        elif FORMAT == 1:  # FP4: E8M0 scale per 4 words (32 values): byte b -> 2^(b - 127)
            sb = tl.load(s_ptr + rows[:, None] * stride_s_row + (offs_w // 4)[None, :],
                         mask=mask, other=0).to(tl.int32)
            s = (sb << 23).to(tl.float32, bitcast=True)
            return s, s
        else:
            one = tl.full([rows.shape[0], offs_w.shape[0]], 1.0, tl.float32)
            return one, one

    @triton.jit
    def _value(words, j, s, zs, FORMAT: tl.constexpr):
        """Value j of every word (j an int, or a tensor broadcasting with words), dequantised
        exactly: (q - z) * s = q * s - z * s (INT2; both products are exact in fp32, so
        their difference is too), e2m1 * s (FP4)."""
        if FORMAT == 2:
            return ((words >> (2 * j)) & 3).to(tl.float32) * s - zs
        elif FORMAT == 1:
            code = (words >> (4 * j)) & 15
            mag, e = (code & 1).to(tl.float32), (code >> 1) & 3
            value = tl.where(e == 0, 0.5 * mag,
                             (1.0 + 0.5 * mag) * (1 << tl.maximum(e - 1, 0)).to(tl.float32))
            return tl.where(code >= 8, -value, value) * s
        else:
            return words.to(tl.float32)

    @triton.jit
    def _tile_rows(tile_expert_ptr, tile_row_ptr, tile_len_ptr, order_ptr,
                   BLOCK_M: tl.constexpr):
        """This program's tile: (expert, rows, sorted rows [BLOCK_M], pairs, row mask)."""
        t = tl.program_id(0)
        expert = tl.load(tile_expert_ptr + t).to(tl.int64)
        length = tl.load(tile_len_ptr + t)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        sorted_rows = tl.load(tile_row_ptr + t) + offs_m
        pairs = tl.load(order_ptr + sorted_rows, mask=m_mask, other=0).to(tl.int64)
        return expert, length, sorted_rows, pairs, m_mask

    @triton.jit
    def _spread(t, PW: tl.constexpr, BLOCK_W: tl.constexpr):
        """[R, BLOCK_W] -> [R, PW * BLOCK_W], column c holding t[:, c % BLOCK_W]."""
        R: tl.constexpr = t.shape[0]
        return tl.reshape(tl.broadcast_to(t[:, None, :], [R, PW, BLOCK_W]), [R, PW * BLOCK_W])

    @triton.jit
    def _dot(a, w, acc, DTYPE: tl.constexpr, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                          input_precision="ieee")
        return tl.dot(a.to(DTYPE), tl.trans(w), acc)

    @triton.jit
    def _accumulate(acc, a_ptr, a_rows, m_mask, stride_a_row, w_ptr, s_ptr, z_ptr, rows,
                    row_mask, n_words, stride_w_row, stride_s_row, stride_z_row,
                    FORMAT: tl.constexpr, PW: tl.constexpr, DTYPE: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr):
        """acc [BLOCK_M, R] += A[a_rows] @ W[rows]^T over all inputs, A staged value-major
        (A[r, j * n_words + w] is input w * PW + j). The sum runs over inputs in any order,
        so a block of words is taken j-major: value j of BLOCK_W words meets A's [BLOCK_M,
        BLOCK_W] slice j. WIDE: the block's PW slices in one tl.dot (K = PW * BLOCK_W, one
        operand staging); else one tl.dot per j (K = BLOCK_W: 16 stagings of a [R, 16]
        slice per INT2 block, no reshape). The tuner times both."""
        for w0 in range(0, n_words, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            w_ok = offs_w < n_words
            words = tl.load(w_ptr + rows[:, None] * stride_w_row + offs_w[None, :],
                            mask=row_mask[:, None] & w_ok[None, :], other=0)
            s, zs = _word_scales(s_ptr, z_ptr, rows, row_mask, offs_w, n_words,
                                 stride_s_row, stride_z_row, FORMAT)
            if WIDE:
                offs_c = tl.arange(0, PW * BLOCK_W)
                cw = w0 + offs_c % BLOCK_W
                cj = offs_c // BLOCK_W
                a = tl.load(a_ptr + a_rows[:, None] * stride_a_row + (cj * n_words + cw)[None, :],
                            mask=m_mask[:, None] & (cw < n_words)[None, :], other=0.0)
                w = _value(_spread(words, PW, BLOCK_W), cj[None, :], _spread(s, PW, BLOCK_W),
                           _spread(zs, PW, BLOCK_W), FORMAT).to(DTYPE)
                acc = _dot(a, w, acc, DTYPE, IEEE)
            else:
                for j in tl.static_range(PW):
                    a = tl.load(a_ptr + a_rows[:, None] * stride_a_row + j * n_words
                                + offs_w[None, :], mask=m_mask[:, None] & w_ok[None, :],
                                other=0.0)
                    w = _value(words, j, s, zs, FORMAT).to(DTYPE)  # the reference's rounding
                    acc = _dot(a, w, acc, DTYPE, IEEE)
        return acc

    @triton.jit
    def _gate_up_kernel(
        # pointers
        xs_ptr,           # [N, PW, H/PW] activations, value-major (the launcher stages them)
        w_ptr,            # [E, 2I, H/PW] words: W1 rows 0..I-1, W3 rows I..2I-1
        s_ptr,            # [E, 2I, .] scales (unused for DENSE)
        z_ptr,            # [E, 2I, H/128] packed zeros (INT2 only)
        order_ptr,        # [P] pair ids, sorted by expert
        weights_ptr,      # [P] fp32 routing weight per pair
        tile_expert_ptr,  # [T] expert of each tile
        tile_row_ptr,     # [T] first row of `order` of each tile
        tile_len_ptr,     # [T] rows of each tile (0: nothing to do)
        h_ptr,            # [P, PW, I/PW] out (activation dtype), row = position in `order`
        # sizes (size_class: an autotune key only)
        K, inter, n_words, size_class,
        # strides
        stride_w_row, stride_s_row, stride_z_row,
        # meta
        limit,
        FORMAT: tl.constexpr, PW: tl.constexpr, HAS_LIMIT: tl.constexpr,
        DTYPE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        WIDE: tl.constexpr = False,
    ):
        expert, length, sorted_rows, pairs, m_mask = _tile_rows(
            tile_expert_ptr, tile_row_ptr, tile_len_ptr, order_ptr, BLOCK_M)
        if length == 0:
            return
        tokens = pairs // K
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        rows = expert * (2 * inter) + offs_n  # int64: expert * rows overflows int32 at E 256
        acc_g = _accumulate(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), xs_ptr, tokens,
                            m_mask, PW * n_words, w_ptr, s_ptr, z_ptr, rows, n_mask, n_words,
                            stride_w_row, stride_s_row, stride_z_row, FORMAT, PW, DTYPE, IEEE,
                            BLOCK_W, WIDE)
        acc_u = _accumulate(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), xs_ptr, tokens,
                            m_mask, PW * n_words, w_ptr, s_ptr, z_ptr, rows + inter, n_mask,
                            n_words, stride_w_row, stride_s_row, stride_z_row, FORMAT, PW,
                            DTYPE, IEEE, BLOCK_W, WIDE)
        # F.linear returns the activation dtype in the reference: round where it does
        g = acc_g.to(DTYPE).to(tl.float32)
        u = acc_u.to(DTYPE).to(tl.float32)
        if HAS_LIMIT:
            u = tl.minimum(tl.maximum(u, -limit), limit)
            g = tl.minimum(g, limit)
        route_w = tl.load(weights_ptr + pairs, mask=m_mask, other=0.0)
        h = g / (1.0 + tl.exp(-g)) * u * route_w[:, None]
        # staged value-major for the down kernel: input n of W2 is value n % PW of word n // PW
        col = (offs_n % PW) * (inter // PW) + offs_n // PW
        tl.store(h_ptr + sorted_rows[:, None] * inter + col[None, :], h.to(DTYPE),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _down_kernel(
        # pointers
        h_ptr,            # [P, PW, I/PW] (activation dtype), row = position in `order`
        w_ptr,            # [E, H, I/PW] W2 words
        s_ptr,            # [E, H, .] scales (unused for DENSE)
        z_ptr,            # [E, H, I/128] packed zeros (INT2 only)
        order_ptr,        # [P] pair ids, sorted by expert
        tile_expert_ptr,  # [T]
        tile_row_ptr,     # [T]
        tile_len_ptr,     # [T]
        parts_ptr,        # [P, H] out (activation dtype): each pair's rounded W2 output, row p
        # sizes (size_class: an autotune key only)
        H, inter, n_words, size_class,
        # strides
        stride_w_row, stride_s_row, stride_z_row,
        # meta
        FORMAT: tl.constexpr, PW: tl.constexpr, DTYPE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        WIDE: tl.constexpr = False,
    ):
        expert, length, sorted_rows, pairs, m_mask = _tile_rows(
            tile_expert_ptr, tile_row_ptr, tile_len_ptr, order_ptr, BLOCK_M)
        if length == 0:
            return
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        acc = _accumulate(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), h_ptr, sorted_rows,
                          m_mask, inter, w_ptr, s_ptr, z_ptr, expert * H + offs_n, n_mask,
                          n_words, stride_w_row, stride_s_row, stride_z_row, FORMAT, PW, DTYPE,
                          IEEE, BLOCK_W, WIDE)
        tl.store(parts_ptr + pairs[:, None] * H + offs_n[None, :], acc.to(DTYPE),
                 mask=m_mask[:, None] & n_mask[None, :])


# -- configs -------------------------------------------------------------------------------


def _parse_config(text: str) -> dict[str, int]:
    """'BLOCK_M=64,BLOCK_N=64,BLOCK_K=256,num_warps=4,num_stages=2[,WIDE=1]' -> dict (the
    pin). BLOCK_K counts inputs: BLOCK_K / PW words a step (16 for INT2 at 256)."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    out = {"WIDE": 0}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in (*keys, "WIDE"):
            raise ValueError(f"bad {CONFIG_ENV} item {item!r} in {text!r}")
        out[key.strip()] = int(value)
    if not set(keys) <= set(out):
        raise ValueError(f"{CONFIG_ENV}={text!r}: give each of {', '.join(keys)}")
    # a tl.dot needs M, N, K >= 16: K is BLOCK_K / 16 INT2 words a dot, or BLOCK_K if WIDE
    if out["BLOCK_M"] < 16 or out["BLOCK_N"] < 16 or out["BLOCK_K"] % (64 if out["WIDE"] else 256):
        raise ValueError(f"{CONFIG_ENV}={text!r}: BLOCK_M and BLOCK_N must be >= 16 and "
                         "BLOCK_K a multiple of 256 (64 with WIDE=1)")
    return out


_BEST: dict[tuple, dict[str, int]] = {}  # (kernel, format, K, H, I, size class, dtype) -> config


def candidate_configs() -> list[dict[str, int]]:
    """Configs tuned per (kernel, format, shape, size class). BLOCK_M 32 beside 64 because
    a 2,048-token chunk gives each of 256 experts ~48 pairs; BLOCK_K 256 inputs = 16 INT2
    words, the least a tl.dot takes (K 16). Few: each compiles for seconds."""
    pinned = os.environ.get(CONFIG_ENV)
    if pinned:
        return [_parse_config(pinned)]
    if os.environ.get("TRITON_INTERPRET") == "1":  # tiny test shapes: one small tile
        # BLOCK_K 64: several steps over the tiny rows (the interpreter's dots take any K)
        return [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 1, "num_stages": 1,
                 "WIDE": 0}]
    # compiled for sm_90 (Triton 3.9, bench/kernels/compile_check.py): 64 x 64 with 4 warps
    # takes 249 / 234 registers (gate_up / down) and no spill; 128 x 64 with 8 warps none in
    # gate_up, 632 bytes in down; 64 x 128 spills in both (280 / 1,088 bytes). These ran at
    # 73 TFLOP/s on an H100 (2,048 tokens, docs/benchmarks.md), each dot K = 16. The WIDE
    # ones (one dot a block, K = BLOCK_K) spill 112-376 bytes; untimed, the tuner decides.
    narrow = [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 256, "num_warps": w, "num_stages": s,
               "WIDE": 0}
              for m, n, w, s in ((64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2))]
    wide = [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": 2,
             "WIDE": 1} for m, n, k, w in ((64, 64, 64, 4), (64, 128, 128, 8))]
    return narrow + wide


def _size_class(pairs: int) -> int:
    """Autotuning key for the pair count (it sets the pairs per expert, hence the best
    BLOCK_M): up to 1K, 1K-8K, 8K-32K, more."""
    return 0 if pairs <= 1024 else 1 if pairs <= 8192 else 2 if pairs <= 32768 else 3


# -- launcher ------------------------------------------------------------------------------


def plan_tiles(experts: torch.Tensor, num_experts: int, block_m: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order [P], tile_expert [T], tile_row [T], tile_len [T]) for experts [N, K], all on
    experts' device with no host sync (see the module docstring)."""
    ids = experts.reshape(-1).long()
    P, E, dev = ids.numel(), num_experts, ids.device
    key = torch.where((ids >= 0) & (ids < E), ids, E)  # invalid ids after every expert
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).index_add_(
        0, key, torch.ones_like(key))[:E]
    tiles = (counts + block_m - 1) // block_m                              # [E]
    tile_end = torch.cumsum(tiles, 0)
    pair_start = torch.cumsum(counts, 0) - counts
    T = -(-P // block_m) + min(E, P)
    t = torch.arange(T, device=dev)
    tile_expert = torch.searchsorted(tile_end, t, right=True)              # E: past the last
    e = tile_expert.clamp(max=E - 1)
    first = t - (tile_end[e] - tiles[e])                                   # tile within expert
    tile_row = pair_start[e] + first * block_m
    tile_len = torch.where(tile_expert < E, (counts[e] - first * block_m).clamp(0, block_m), 0)
    return order, tile_expert.to(torch.int32), tile_row, tile_len.to(torch.int32)


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                    stack: ExpertStack, limit: float | None) -> torch.Tensor:
    """x [N, H], experts [N, K] int, weights [N, K] fp32 -> [N, H] fp32: the routed sum of
    engine.routed_experts.routed_experts, for many tokens. Never syncs with the host; expert
    ids outside [0, E) contribute nothing."""
    N, H = x.shape
    check_inputs(x, experts, weights, stack, "grouped experts")
    if not use_triton(x) or N == 0:
        return routed_experts_reference(x, experts, weights, stack, limit)

    fmt = _FORMAT_CODE[stack.format]
    K, inter, E = experts.shape[1], stack.inter, stack.num_experts
    if fmt != FMT_DENSE and (H % (64 if fmt == FMT_INT2 else 32)
                             or inter % (64 if fmt == FMT_INT2 else 32)):
        raise ValueError(f"grouped experts: {stack.format} needs H and I in whole scale groups")
    P = N * K
    PW = _PER_WORD[fmt]
    # value-major x (xs[t, j, w] = x[t, w * PW + j]): the kernels dot value j of a block of
    # words with the matching slice of x (one copy, N x H)
    xs = x.reshape(N, H // PW, PW).transpose(1, 2).contiguous()
    w = weights.reshape(P).to(torch.float32).contiguous()
    dtype = getattr(tl, _TL_DTYPE[x.dtype])
    # exact fp32 dots for fp32 inputs (no TF32), and in the CPU interpreter, which multiplies
    # bf16 tl.dot operands as their raw uint16 bits (Triton 3.9 interpreter.py create_dot):
    # bf16 x bf16 products are exact in fp32, so the numerics are the GPU's either way
    ieee = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    h = torch.empty(P, inter, dtype=x.dtype, device=x.device)  # value-major rows
    parts = torch.zeros(P, H, dtype=x.dtype, device=x.device)  # invalid pairs stay 0

    # the tile plan depends on BLOCK_M: one per config tried, made when first needed
    plans: dict[int, tuple[torch.Tensor, ...]] = {}

    def plan(block_m: int) -> tuple[torch.Tensor, ...]:
        if block_m not in plans:
            plans[block_m] = plan_tiles(experts, E, block_m)
        return plans[block_m]

    words13, s13, z13 = kernel_views(stack, "13")
    words2, s2, z2 = kernel_views(stack, "2")
    size = _size_class(P)

    for kernel in ("gate_up", "down"):
        _launch(kernel, plan, xs, h, parts, w, words13, s13, z13, words2, s2, z2, K, H, inter,
                size, limit, fmt, PW, dtype, ieee)
    return parts.view(N, K, H).float().sum(dim=1)


def _launch(kernel, plan, xs, h, parts, w, words13, s13, z13, words2, s2, z2, K, H, inter,
            size, limit, fmt, PW, dtype, ieee) -> None:
    """Launch one kernel under its best config. The tile plan depends on BLOCK_M, so rather
    than Triton's autotuner (whose grid may change, its arguments not) each BLOCK_M is
    timed with its own plan on the first call of a shape and the winner kept."""
    key = (kernel, fmt, K, H, inter, size, xs.dtype)
    best = _BEST.get(key)
    configs = [best] if best is not None else candidate_configs()
    if xs.is_cuda and torch.cuda.is_current_stream_capturing():
        configs = configs[:1]  # no timing inside a CUDA graph capture (a batch over 64 rows)

    def run(cfg: dict[str, int]) -> None:
        order, tile_expert, tile_row, tile_len = plan(cfg["BLOCK_M"])
        meta = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                # DENSE words are single values: 64 a step (256 fp32 ones overflowed the
                # 227 KB of shared memory on an H100)
                "BLOCK_W": min(cfg["BLOCK_K"] // PW, 64), "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"], "WIDE": bool(cfg.get("WIDE", 0))}
        if kernel == "gate_up":
            grid = (tile_expert.numel(), triton.cdiv(inter, cfg["BLOCK_N"]))
            _gate_up_kernel[grid](
                xs, words13, s13, z13, order, w, tile_expert, tile_row, tile_len, h,
                K, inter, H // PW, size,
                words13.stride(1), s13.stride(1), z13.stride(1),
                0.0 if limit is None else float(limit),
                FORMAT=fmt, PW=PW, HAS_LIMIT=limit is not None, DTYPE=dtype, IEEE=ieee, **meta)
        else:
            grid = (tile_expert.numel(), triton.cdiv(H, cfg["BLOCK_N"]))
            _down_kernel[grid](
                h, words2, s2, z2, order, tile_expert, tile_row, tile_len, parts,
                H, inter, inter // PW, size, words2.stride(1), s2.stride(1), z2.stride(1),
                FORMAT=fmt, PW=PW, DTYPE=dtype, IEEE=ieee, **meta)

    if len(configs) == 1:
        run(configs[0])
        return
    timings = [(triton.testing.do_bench(lambda c=c: run(c), warmup=2, rep=10), i)
               for i, c in enumerate(configs)]
    winner = configs[min(timings)[1]]
    _BEST[key] = winner
    run(winner)  # the timed runs wrote the same values; this one leaves them final


__all__ = ["CONFIG_ENV", "candidate_configs", "grouped_experts", "plan_tiles"]
