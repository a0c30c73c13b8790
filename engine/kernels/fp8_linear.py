"""FP8 block-scaled linear layers: y = x @ W.T with W stored float8_e4m3fn + E8M0 scales.

60% of the bytes a decoded token reads are these weights, so decode (M = 1..32 rows) is a
memory-bound GEMV and everything here serves one rule: read each weight byte exactly once.

Shapes (G groups; G = 1 for a plain linear, attention's `wo_a` uses G = 8):

    x      [M, G, K]                 bf16 (the model) | fp16 | f32 (the tiny test model)
    weight [G*N, K]                  float8_e4m3fn, row-major (group g owns rows g*N..(g+1)*N)
    scale  [ceil(G*N/128), ceil(K/128)]  E8M0 bytes: W[i, j] = e4m3(w[i, j]) * 2^(s[i//128, j//128] - 127)
    out    [M, G, N]                 x.dtype

Decode kernel (`_fp8_linear_kernel`, M <= 32): one program owns BLOCK_N weight rows of one
group and a slice of the K axis. It walks that slice 128 columns at a time (one scale block),
upcasts the FP8 tile to x's dtype in registers (exact: every e4m3 value fits bf16/fp16/f32),
and either
  - USE_DOT: acc[BLOCK_N, BLOCK_M] += dot(w_tile, x_tile^T) * 2^(s-127): the weight is the
    MMA's wide side, the (padded to 16 or 32) batch the narrow one; or
  - FMA (M = 1): acc[BLOCK_N, 128] += w * scale * x, reduced across K once at the end, which
    skips the padding of a 1-row batch to a 16-wide MMA.
Every partial sum is fp32. All M rows share one pass over the weight (BLOCK_M >= M), so the
weight is never read twice; x (at most 32 x 8192 bf16 = 512 KB) stays in L2.

Split-K: small-N shapes (wkv 512 x 4096: 4 row tiles of 128) cannot fill 132 SMs by rows
alone, so the K axis is also split over SPLIT_K programs. Partials go to an fp32 workspace
[SPLIT_K, M, G, N]; each program then bumps its row tile's arrival counter, and the program
that arrives last sums the tile's SPLIT_K partials in a fixed order (slice 0 first), casts,
stores, and resets the counter to 0 for the next launch. One launch, where a separate
reduction kernel cost ~2.4 us a call on an H100 (100 calls in a 20-layer step). Chosen over
fp32 atomic_add into a zeroed buffer because it is deterministic (the same input gives the
same bits run to run, which the greedy-equality tests rely on) and needs no memset launch;
the workspace costs at most SPLIT_K * M * N * 4 bytes that stay in L2 (1 MB for wkv at
M = 32). The counters are one zeroed int32 buffer per stream lane (engine/kernels/
_counters.py) shared by its launches: they run one after another and each leaves its
counters at 0. Static shapes and no
host sync, so a CUDA graph captures it; the workspace comes from the caching allocator (the
graph's private pool under capture).

Configs: `_candidate_configs(M bucket, N, K)` generates a handful of (BLOCK_N, SPLIT_K,
USE_DOT, warps, stages); with autotuning on (the default on CUDA) each new key
(M bucket in {1, 16, 32}, G, N, K, dtype, act_quant) times them once, each launched 32 times
in a CUDA graph on weight copies that overflow L2 (device time of cold weights, as in a
decode step; eager timing measured the host launch), and keeps the fastest. Under
CUDA-graph capture an untuned key takes the heuristic first candidate (tuning would sync),
so warm the model up before capturing. `pin_config` forces one config.

Prefill (M > 32): the weight is dequantised to x.dtype per call (transient G*N*K*2 bytes,
67 MB for wq_b) and multiplied with torch's matmul; with act_quant on a CUDA card of
capability >= 8.9 it instead runs `torch._scaled_mm` with DeepSeek-style block scales
(activation 1 x 128, weight 128 x 128).

Numerics. Default: bf16 activations meet the exactly dequantised weight, fp32 accumulation
(the same as the reference path `F.linear(x, dequantize_fp8(W))` up to summation order).
Option `act_quant` (`set_act_quant(True)`, read by engine.linear.Linear): the activation is
first quantised to e4m3 per 128 channels exactly as DeepSeek-V4's inference/kernel.py
`act_quant(x, 128, scale_fmt="ue8m0")` does:
    amax = max(|x_block|, 1e-4);  s = 2^ceil(log2(amax * (1/448)));  q = e4m3(clamp(x/s, +-448))
and y = sum over K blocks of (q . w) * s * 2^(s_w - 127), in fp32. In the kernel the rounding
to e4m3 is done with fp32 bit arithmetic (round to nearest even at the block's e4m3 step):
identical on the GPU and under TRITON_INTERPRET, whose own fp32->fp8 cast rounds wrongly at
binade edges (Triton 3.9). The products then run through the same bf16 MMA as the default
path: e4m3 x e4m3 is exact in fp32, so this is DeepSeek's formula with fp32 accumulation
(DeepSeek's FP8 MMA accumulates less precisely inside a 128 block). For M <= 32 it costs the
same as the default (the weight bytes dominate); for prefill `_scaled_mm` doubles MMA rate.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
import torch.nn.functional as F

from engine import formats as fm
from engine.kernels import pdl_launch, use_triton
from engine.kernels._counters import arrival_counters
from engine.kernels._device_math import round_bf16, wait_for_inputs
from engine.kernels._triton import LazyModule
from engine.kernels.swiglu import swiglu as swiglu_op

# Imported at the first launch (`_lazy.materialize`): the base install has no triton, and a CPU
# test session must set TRITON_INTERPRET before triton is imported at all.
triton = tl = None

BLOCK_K = 128          # one E8M0 scale block along K per step (not tuned: it is the format)
MAX_DECODE_ROWS = 32   # M above this is prefill: dequantise + matmul
FP8_MAX = fm.FP8_MAX
ACT_AMAX_FLOOR = 1e-4  # DeepSeek's act_quant floor, so an all-zero block does not divide by 0


# what the decode kernel applies to x as it loads it: ("swiglu",) or None
Prologue = tuple | None

_lazy = LazyModule(globals())  # Triton jitted at the first launch (engine/kernels/_triton.py)


# -- kernels -----------------------------------------------------------------------------


@_lazy.mark
def _e8m0_to_f32(s):
    """E8M0 bytes (int32 0..254) -> exact fp32 2^(s-127); byte 0 is the subnormal 2^-127."""
    bits = tl.where(s == 0, 0x400000, s << 23)
    return bits.to(tl.float32, bitcast=True)


@_lazy.mark
def _quant_e4m3(x, inv_s):
    """x * inv_s clamped to +-448 and rounded to the nearest e4m3 value (ties to even).

    Adding then subtracting 1.5 * 2^23 * step rounds to a multiple of `step` in fp32 round
    to nearest even; step is the e4m3 spacing of the value's binade (2^(e-3), e >= -6 where
    subnormals start)."""
    y = tl.minimum(tl.maximum(x * inv_s, -448.0), 448.0)
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0  # 1.5 * 2^23
    return (y + magic) - magic


@_lazy.mark
def _act_scale(amax):
    """DeepSeek-V4's ue8m0 activation scale: 2^ceil(log2(max(amax, 1e-4) / 448)), by bits."""
    t = tl.maximum(amax, 1e-4) * (1.0 / 448.0)
    bits = t.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + tl.where((bits & 0x7FFFFF) != 0, 1, 0)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@_lazy.mark
def _fp8_linear_kernel(
    # pointers
    x_ptr,      # [M, G, K] x.dtype
    w_ptr,      # [G*N, K] float8_e4m3fn, K contiguous
    s_ptr,      # [ceil(G*N/128), ceil(K/128)] uint8 (E8M0)
    out_ptr,    # [M, G, N] x.dtype
    part_ptr,   # fp32 partials [SPLIT_K, M, G, N] (SPLIT only)
    count_ptr,  # int32 [row tiles] arrival counters, 0 between launches (SPLIT only)
    # sizes
    M, N, K, kb_per_split,
    u_offset,   # elements from x's gate half to its up half (SWIGLU only)
    # strides
    stride_xm, stride_xg, stride_xk,
    stride_wn,
    stride_sn, stride_sk,
    stride_ps, stride_om, stride_og, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
    ACT_QUANT: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
    SWIGLU: tl.constexpr, ROUND_BF16: tl.constexpr, PREFETCH: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    BK: tl.constexpr = 128
    pid_n = tl.program_id(0)  # over G * cdiv(N, BLOCK_N) row tiles
    pid_k = tl.program_id(1)  # over SPLIT_K slices of the K axis
    tiles_per_group = tl.cdiv(N, BLOCK_N)
    g = pid_n // tiles_per_group
    offs_n = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows in the group
    mask_n = offs_n < N
    # int64: row * stride reaches 2.7e8 at wq_b and would overflow int32 in bigger models
    rows = (g * N + offs_n).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]       # [BLOCK_N, BK]
    s_ptrs = s_ptr + (rows // 128) * stride_sn                          # [BLOCK_N]
    x_base = x_ptr + g.to(tl.int64) * stride_xg
    xt_ptrs = x_base + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk  # [BK, BLOCK_M]

    kb_start = pid_k * kb_per_split
    kb_end = tl.minimum(kb_start + kb_per_split, tl.cdiv(K, BK))
    wait_for_inputs(PDL)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BK // 16), dtype=tl.float32)
    if PREFETCH:  # the FMA path's loads feed no tl.dot, so Triton's pipeliner leaves them
        w_ahead, s_ahead = _weight_block(w_ptrs, s_ptrs, kb_start, kb_end, mask_n, offs_k, K,
                                         stride_sk, EVEN_K, True)
    for kb in range(kb_start, kb_end):
        k0 = kb * BK
        if not EVEN_K:
            mask_k = (k0 + offs_k) < K
        if PREFETCH:  # block kb arrived while block kb - 1 was multiplied; ask for kb + 1
            w, sw = w_ahead, s_ahead
            w_ahead, s_ahead = _weight_block(w_ptrs, s_ptrs, kb + 1, kb_end, mask_n, offs_k,
                                             K, stride_sk, EVEN_K, True)
        else:
            w, sw = _weight_block(w_ptrs, s_ptrs, kb, kb_end, mask_n, offs_k, K, stride_sk,
                                  EVEN_K, False)
        if USE_DOT:
            if EVEN_K:  # noqa: SIM108 (a constexpr branch)
                x_mask = mask_m[None, :]
            else:
                x_mask = mask_k[:, None] & mask_m[None, :]
            xt = tl.load(xt_ptrs + k0 * stride_xk, mask=x_mask, other=0.0)
            if SWIGLU:
                ut = tl.load(xt_ptrs + k0 * stride_xk + u_offset, mask=x_mask, other=0.0)
                xt = _swiglu_x(xt, ut, ROUND_BF16)
            if ACT_QUANT:
                xf = xt.to(tl.float32)
                sa = _act_scale(tl.max(tl.abs(xf), axis=0))                  # [BLOCK_M]
                xt = _quant_e4m3(xf, 1.0 / sa[None, :]).to(xt.dtype)       # e4m3 values, exact
            if DOT_F32:
                # f32 x, and the interpreter (whose bf16 dot multiplies the raw bits)
                part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(w.to(xt.dtype), xt)                           # fp32 accumulate
            if ACT_QUANT:
                acc += part * sw[:, None] * sa[None, :]
            else:
                acc += part * sw[:, None]
        else:
            if EVEN_K:
                xr = tl.load(x_base + (k0 + offs_k) * stride_xk)
            else:
                xr = tl.load(x_base + (k0 + offs_k) * stride_xk, mask=mask_k, other=0.0)
            if SWIGLU:
                if EVEN_K:
                    ur = tl.load(x_base + (k0 + offs_k) * stride_xk + u_offset)
                else:
                    ur = tl.load(x_base + (k0 + offs_k) * stride_xk + u_offset, mask=mask_k,
                                 other=0.0)
                xr = _swiglu_x(xr, ur, ROUND_BF16)
            xr = xr.to(tl.float32)
            if ACT_QUANT:
                sa1 = _act_scale(tl.max(tl.abs(xr), axis=0))
                xr = _quant_e4m3(xr, 1.0 / sa1) * sa1  # exact: e4m3 value times a power of 2
            # each thread's 16 consecutive products (one 16-byte load) summed in registers,
            # then scaled once: an [N, 8] accumulator, not [N, 128] (which took every
            # register and spilled at BLOCK_N 32 and more)
            prod = tl.reshape(w.to(tl.float32) * xr[None, :], (BLOCK_N, BK // 16, 16))
            acc2 += tl.sum(prod, axis=2) * sw[:, None]

    # one offset for this tile's outputs, in out [M, G, N] and in each partial slice
    if USE_DOT:
        offs_out = g * stride_og + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        mask_out = mask_n[:, None] & mask_m[None, :]
        result = acc
    else:
        offs_out = g * stride_og + offs_n * stride_on
        mask_out = mask_n
        result = tl.sum(acc2, axis=1)
    if SPLIT:
        tl.store(part_ptr + pid_k * stride_ps + offs_out, result, mask=mask_out)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        num_splits = tl.num_programs(1)
        if arrived == num_splits - 1:  # the last slice of this tile: reduce, in slice order
            total = tl.zeros(result.shape, dtype=tl.float32)
            for s in range(0, num_splits):
                total += tl.load(part_ptr + s * stride_ps + offs_out, mask=mask_out, other=0.0,
                                 cache_modifier=".cg")  # L2: other SMs wrote these
            tl.store(out_ptr + offs_out, total, mask=mask_out)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch
    else:
        tl.store(out_ptr + offs_out, result, mask=mask_out)


@_lazy.mark
def _weight_block(w_ptrs, s_ptrs, kb, kb_end, mask_n, offs_k, K, stride_sk,
                  EVEN_K: tl.constexpr, AHEAD: tl.constexpr):
    """K block kb of the tile's rows, FP8, and its E8M0 row scales as fp32. AHEAD (a block
    asked for before it is needed: it may lie past the slice) loads nothing for kb >= kb_end;
    without it the mask stays the rows' (the extra guard costs the dot path 18 registers)."""
    BK: tl.constexpr = 128
    k0 = kb * BK
    if AHEAD:  # noqa: SIM108 (a constexpr branch)
        rows_ok = mask_n & ((tl.zeros(mask_n.shape, tl.int32) + kb) < kb_end)
    else:
        rows_ok = mask_n
    if EVEN_K:  # noqa: SIM108 (a constexpr branch)
        mask = rows_ok[:, None]
    else:
        mask = rows_ok[:, None] & ((k0 + offs_k) < K)[None, :]
    w = tl.load(w_ptrs + k0, mask=mask, other=0.0)
    s = tl.load(s_ptrs + kb * stride_sk, mask=rows_ok, other=127).to(tl.int32)
    return w, _e8m0_to_f32(s)


@_lazy.mark
def _swiglu_x(g, u, ROUND_BF16: tl.constexpr):
    """engine/kernels/swiglu.py's h = silu(g) * u in fp32, rounded to g's dtype (nearest even
    in integers when bf16: the interpreter's cast truncates)."""
    gf = g.to(tl.float32)
    h = gf * tl.sigmoid(gf) * u.to(tl.float32)
    if ROUND_BF16:
        h = round_bf16(h)
    return h.to(g.dtype)


# -- configs -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fp8LinearConfig:
    block_n: int
    split_k: int
    use_dot: bool
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False  # FMA path: the next K block's load issued before this one's math


_state = {"act_quant": False, "autotune": True, "pinned": None}
_tuned: dict[tuple, Fp8LinearConfig] = {}


def set_act_quant(on: bool) -> None:
    """The engine's one activation-precision setting (engine.linear.Linear reads it)."""
    _state["act_quant"] = bool(on)


def act_quant_enabled() -> bool:
    return _state["act_quant"]


def set_autotune(on: bool) -> None:
    """Off: every key takes its heuristic config (cheap, and the same on every run)."""
    _state["autotune"] = bool(on)


def pin_config(config: Fp8LinearConfig | None) -> None:
    """Force one config for every decode call (None restores autotune/heuristics)."""
    _state["pinned"] = config


def m_bucket(m: int) -> int:
    """Row counts sharing a config: the dot pads the batch to 16 or 32."""
    return 1 if m == 1 else (16 if m <= 16 else 32)


def _split_for(tiles: int, num_kb: int, num_sms: int) -> int:
    """Smallest power-of-two split-K giving ~2 programs per SM, keeping >= 2 K blocks each."""
    split = 1
    while tiles * split < 2 * num_sms and split * 2 <= num_kb // 2:
        split *= 2
    return split


def _candidate_configs(mb: int, rows: int, k: int, num_sms: int) -> list[Fp8LinearConfig]:
    """Configs to try for an (M bucket, G*N rows, K) key; the first is the heuristic default.

    At most 27 (M = 1: both paths x 3 BLOCK_N x 3 splits, the FMA ones with and without
    the prefetch) so that tuning a key costs well
    under a second once compiled; warps and stages are tied to BLOCK_N instead of searched
    (8 warps only for 128-row tiles, which need two warpgroups' worth of rows)."""
    num_kb = -(-k // BLOCK_K)
    paths = (False, True) if mb == 1 else (True,)
    out: list[Fp8LinearConfig] = []
    for use_dot in paths:
        for block_n in ((32, 64, 16) if not use_dot else (64, 32, 128)):
            warps = 8 if block_n == 128 else 4
            s = _split_for(-(-rows // block_n), num_kb, num_sms)
            for split in dict.fromkeys((s, max(1, s // 2), min(2 * s, num_kb))):
                out.append(Fp8LinearConfig(block_n, split, use_dot, warps, 3))
                # a prefetch needs 2+ blocks a slice (compiled for sm_90 the FMA tile takes
                # 55 / 75 registers at BLOCK_N 32 / 64, 89 / 156 with the prefetch: no spill)
                if not use_dot and num_kb // split > 1:
                    out.append(Fp8LinearConfig(block_n, split, use_dot, warps, 3, True))
    return out


# -- launchers -----------------------------------------------------------------------------


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: only shapes the heuristics (H100 SXM's count)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


MAX_SPLIT_TILES = 1 << 14  # arrival counters per device: G * cdiv(N, BLOCK_N) of any launch


def _arrival_counters(device: torch.device) -> torch.Tensor:
    """The split-K tiles' arrival counters of the current stream's lane (engine/kernels/
    _counters.py): zeroed once, left at 0 by every launch."""
    return arrival_counters(device, MAX_SPLIT_TILES)


def _launch(x3: torch.Tensor, weight: torch.Tensor, scale_u8: torch.Tensor, n: int,
            cfg: Fp8LinearConfig, act_quant: bool, prologue: Prologue = None) -> torch.Tensor:
    """x3 [M, G, K] (or [M, G, 2K]: the SwiGLU's gate | up) -> [M, G, N] through the decode
    kernel (split-K reduced in the kernel), x first through the prologue if any."""
    swiglu = prologue is not None
    m, g = x3.shape[:2]
    k = weight.shape[1]
    num_kb = -(-k // BLOCK_K)
    split = max(1, min(cfg.split_k, num_kb))
    kb_per_split = -(-num_kb // split)
    split = -(-num_kb // kb_per_split)  # no empty slices
    _lazy.materialize()
    out = torch.empty(m, g, n, device=x3.device, dtype=x3.dtype)
    if m == 0:
        return out
    tiles = g * triton.cdiv(n, cfg.block_n)
    if split > 1 and tiles > MAX_SPLIT_TILES:
        split, kb_per_split = 1, num_kb  # more tiles than counters fill the card by rows alone
    part = out if split == 1 else torch.empty(split, m, g, n, device=x3.device, dtype=torch.float32)
    counters = _arrival_counters(x3.device)
    use_dot = cfg.use_dot or m > 1  # the FMA path handles exactly one row
    _fp8_linear_kernel[(tiles, split)](
        x3, weight, scale_u8, out, part, counters,
        m, n, k, kb_per_split, k * x3.stride(2),
        x3.stride(0), x3.stride(1), x3.stride(2),
        weight.stride(0),
        scale_u8.stride(0), scale_u8.stride(1),
        part.stride(0), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=16 if m <= 16 else 32, BLOCK_N=cfg.block_n, USE_DOT=use_dot,
        ACT_QUANT=act_quant, DOT_F32=x3.dtype == torch.float32 or not x3.is_cuda,
        EVEN_K=k % BLOCK_K == 0, SPLIT=split > 1,
        SWIGLU=swiglu, ROUND_BF16=x3.dtype == torch.bfloat16,
        PREFETCH=cfg.prefetch and not use_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x3),
    )
    return out


def _config_for(x3: torch.Tensor, weight: torch.Tensor, scale_u8: torch.Tensor, n: int,
                act_quant: bool, prologue: Prologue = None) -> Fp8LinearConfig:
    if _state["pinned"] is not None:
        return _state["pinned"]
    m, g = x3.shape[:2]
    k = weight.shape[1]
    mb = m_bucket(m)
    key = (mb, g, n, k, x3.dtype, act_quant, str(x3.device), prologue and prologue[0])
    if key in _tuned:  # before the candidates: an eager call's Python is most of its time
        return _tuned[key]
    candidates = _candidate_configs(mb, g * n, k, _num_sms(x3.device))
    tunable = (_state["autotune"] and x3.is_cuda and len(candidates) > 1
               and not torch.cuda.is_current_stream_capturing())
    if not tunable:
        return candidates[0]
    probe = torch.randn(mb, g, x3.shape[2], device=x3.device, dtype=x3.dtype)
    # as many weight copies as overflow L2, so every timed launch reads its weight from
    # DRAM as a decode step does (one pass over 5 GB evicts everything between two uses)
    copies = max(1, min(16, -(-TUNE_COLD_BYTES // max(1, weight.numel()))))
    weights = [(weight, scale_u8)] + [(weight.clone(), scale_u8.clone())
                                      for _ in range(copies - 1)]
    times = [_graph_seconds([lambda c=c, w=w, s=s: _launch(probe, w, s, n, c, act_quant,
                                                             prologue) for w, s in weights])
             for c in candidates]
    del weights
    _tuned[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _tuned[key]


TUNE_COLD_BYTES = 96 << 20  # > the H100's 50 MB and the H200's 60 MB of L2
TUNE_LAUNCHES = 32


def _graph_seconds(calls: list, reps: int = 5) -> float:
    """Device seconds a call, calls[i % len] launched TUNE_LAUNCHES times in one CUDA graph and
    the graph replayed (best of reps). Timed eagerly (do_bench), a ~10 us GEMV measures its
    host launch, not the kernel: the picks for the small shapes were noise."""
    for call in calls:
        call()  # compiles; the graph must not
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(TUNE_LAUNCHES):
            calls[i % len(calls)]()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps + 1):  # the first replay warms up
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / TUNE_LAUNCHES)
    return best


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rows: int, k: int) -> None:
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_linear: weight must be float8_e4m3fn, got {weight.dtype}")
    if scale.dtype not in fm.E8M0_DTYPES:
        raise TypeError(f"fp8_linear: scale must be float8_e8m0fnu or uint8, got {scale.dtype}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] != rows:
        raise ValueError(f"fp8_linear: weight {list(weight.shape)} does not fit x's K={k} "
                         f"and {rows} output rows")
    if tuple(scale.shape) != fm.fp8_scale_shape(rows, k):
        raise ValueError(f"fp8_linear: scale {list(scale.shape)} is not "
                         f"{list(fm.fp8_scale_shape(rows, k))} for weight {list(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("fp8_linear: weight must be row-major (K contiguous)")
    if x.dtype not in fm.DENSE_DTYPES:
        raise TypeError(f"fp8_linear: x must be bf16, fp16 or f32, got {x.dtype}")


def _grouped(x3: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, n: int,
             act_quant: bool, prologue: Prologue = None) -> torch.Tensor:
    """[M, G, K] -> [M, G, N]: Triton for decode, dequant + matmul for prefill / reference.
    The decode kernel applies the prologue as it loads x; elsewhere its own kernel runs
    first."""
    m = x3.shape[0]
    if use_triton(x3) and m <= MAX_DECODE_ROWS:
        scale_u8 = scale.view(torch.uint8)
        cfg = _config_for(x3, weight, scale_u8, n, act_quant, prologue)
        return _launch(x3, weight, scale_u8, n, cfg, act_quant, prologue)
    x3 = _apply_prologue(x3, prologue)
    if use_triton(x3):
        return _prefill(x3, weight, scale, n, act_quant)
    return fp8_linear_reference(x3, weight, scale, n, act_quant=act_quant)


def _apply_prologue(x: torch.Tensor, prologue: Prologue) -> torch.Tensor:
    """The prologue as its own op (the reference path, prefill rows)."""
    if prologue is None:
        return x
    k = x.shape[-1] // 2
    return swiglu_op(x.reshape(-1, 2 * k)).view(*x.shape[:-1], k)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
               act_quant: bool = False, swiglu: bool = False) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K], scale).T -> [..., N] in x.dtype. swiglu: x is
    [..., 2K], gate | up, and the product is with engine/kernels/swiglu.py's swiglu(x),
    applied by the GEMV as it reads x (the shared expert's w2: one launch fewer)."""
    k = x.shape[-1] // 2 if swiglu else x.shape[-1]
    if swiglu and (x.shape[-1] % 2 or weight.dim() != 2 or weight.shape[1] != k):
        raise ValueError(f"fp8_linear: swiglu wants x [..., 2K] (gate | up) for weight "
                         f"{list(weight.shape)}, got {list(x.shape)}")
    prologue = ("swiglu",) if swiglu else None
    _check(x[..., :k] if swiglu else x, weight, scale, weight.shape[0], k)
    n = weight.shape[0]
    if not use_triton(x):  # the oracle, exactly engine.linear's plain path when act_quant is off
        x = _apply_prologue(x, prologue)
        if act_quant:
            x = act_dequant(*act_quant_reference(x), x.dtype)
        return F.linear(x, fm.dequantize_fp8(weight, scale, x.dtype))
    lead = x.shape[:-1]
    out = _grouped(x.reshape(-1, 1, x.shape[-1]), weight, scale, n, act_quant, prologue)
    return out.view(*lead, n)


def fp8_linear_grouped(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
                       act_quant: bool = False) -> torch.Tensor:
    """x [M, G, K], weight [G*N, K] (group g: rows g*N..(g+1)*N) -> [M, G, N] in x.dtype."""
    if x.dim() != 3:
        raise ValueError(f"fp8_linear_grouped: x must be [M, G, K], got {list(x.shape)}")
    _, g, k = x.shape
    if weight.dim() != 2 or weight.shape[0] % g:
        raise ValueError(f"fp8_linear_grouped: weight {list(weight.shape)} rows are not a "
                         f"multiple of G={g}")
    _check(x, weight, scale, weight.shape[0], k)
    return _grouped(x, weight, scale, weight.shape[0] // g, act_quant)


# -- references and the prefill path -------------------------------------------------------


def act_quant_reference(x: torch.Tensor, block: int = BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's act_quant(x, 128, scale_fmt="ue8m0") in plain PyTorch.

    x [..., K] -> (q float8_e4m3fn [..., K], s f32 [..., ceil(K/128)]) with x ~= q * s per
    block. ceil(log2(.)) comes from frexp, exact where torch.log2 can round a value just above
    a power of two down onto it. A partial last block takes its amax over its own columns."""
    k = x.shape[-1]
    nb = -(-k // block)
    xf = F.pad(x.float(), (0, nb * block - k)).unflatten(-1, (nb, block))
    t = xf.abs().amax(-1).clamp(min=ACT_AMAX_FLOOR) * torch.tensor(1.0 / FP8_MAX)
    mant, exp = torch.frexp(t)  # t = mant * 2^exp, mant in [0.5, 1)
    s = torch.ldexp(torch.ones_like(t), torch.where(mant == 0.5, exp - 1, exp))
    q = (xf / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :k], s


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of act_quant_reference (exact in bf16/f32: e4m3 times a power of two)."""
    k = q.shape[-1]
    return (q.float() * s.repeat_interleave(BLOCK_K, dim=-1)[..., :k]).to(dtype)


def _dense_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_fp8 without its fp32 [N, K] temporaries: one [N, K] tensor of `dtype`."""
    n, k = weight.shape
    if n % BLOCK_K or k % BLOCK_K or dtype == torch.float16:  # fp16 could overflow mid-way
        return fm.dequantize_fp8(weight, scale, dtype)
    w = weight.to(dtype)
    factor = fm.e8m0_to_float(scale).to(dtype)  # powers of two: exact in bf16 and f32
    w.view(n // BLOCK_K, BLOCK_K, k // BLOCK_K, BLOCK_K).mul_(factor[:, None, :, None])
    return w


def _grouped_matmul(x3: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    g = x3.shape[1]
    if g == 1:
        return F.linear(x3, w)
    return torch.einsum("mgk,gnk->mgn", x3, w.view(g, n, -1))


def fp8_linear_reference(x3: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, n: int, *,
                         act_quant: bool = False) -> torch.Tensor:
    """The oracle: x3 [M, G, K] against the exactly dequantised weight (engine.formats)."""
    if act_quant:
        x3 = act_dequant(*act_quant_reference(x3), x3.dtype)
    return _grouped_matmul(x3, fm.dequantize_fp8(weight, scale, x3.dtype), n)


_scaled_mm_refused: set[str] = set()  # devices whose torch/cuBLAS refused block scales once


def _scaled_mm_ok(x3: torch.Tensor, weight: torch.Tensor) -> bool:
    """DeepSeek-style block-scaled `_scaled_mm` needs an FP8 CUDA card and whole 128 blocks."""
    rows, k = weight.shape
    return (x3.is_cuda and x3.shape[1] == 1 and x3.dtype == torch.bfloat16
            and str(x3.device) not in _scaled_mm_refused
            and _capability(x3.device) >= (8, 9)
            and rows % BLOCK_K == 0 and k % BLOCK_K == 0)


def _prefill(x3: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, n: int,
             act_quant: bool) -> torch.Tensor:
    if act_quant and _scaled_mm_ok(x3, weight):
        m = x3.shape[0]
        q, s = act_quant_reference(x3[:, 0])                          # [M, K], [M, K/128]
        # scale_a must be [M, K/128] column-major, scale_b the checkpoint's [N/128, K/128]
        # transposed (engine.md section 8: other layouts fail "Invalid scaling configuration")
        scale_a = torch.empty(s.shape[1], m, device=s.device, dtype=torch.float32).t()
        scale_a.copy_(s)
        scale_b = fm.e8m0_to_float(scale).t()
        try:
            y = torch._scaled_mm(q, weight.t(), scale_a=scale_a, scale_b=scale_b,
                                 out_dtype=x3.dtype)
            return y.view(m, 1, n)
        except RuntimeError as e:  # e.g. a torch/cuBLAS without 128-block scaling (pre-Hopper)
            warnings.warn(f"torch._scaled_mm refused DeepSeek block scales ({e}); prefill "
                          "with act_quant dequantises instead on this device", stacklevel=2)
            _scaled_mm_refused.add(str(x3.device))
    if act_quant:
        x3 = act_dequant(*act_quant_reference(x3), x3.dtype)
    return _grouped_matmul(x3, _dense_weight(weight, scale, x3.dtype), n)


__all__ = ["Fp8LinearConfig", "act_quant_enabled", "act_quant_reference", "fp8_linear",
           "fp8_linear_grouped", "fp8_linear_reference", "m_bucket", "pin_config",
           "set_act_quant", "set_autotune"]
