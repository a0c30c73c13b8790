"""Decode attention: one query token per row over its window ring and chosen compressed entries.

Every V4 layer is MQA over one D-wide latent per key that is both key and value, shared by all
heads. Row b (pool slot s = slots[b], query position p = positions[b]) attends to L = W + Kc keys:

  j <  W   window[s, j]                       valid iff j <= p or p >= W-1 (ring slot = pos % W)
  j >= W   entries[s, entry_idx[b, j - W]]    valid iff entry_idx[b, j - W] >= 0

  out[b, h] = sum_j softmax_j(q[b, h] . k_j * scale  (+ one sink logit sink[h])) k_j

The sink is one extra logit per head whose value is dropped: it only adds exp(sink - max) to
the denominator (engine/attention.py `_attend`). The output keeps the keys' RoPE rotation;
with `rope=(cos, sin)` (the query position's, [B, R/2]) the kernel that writes the output
also rotates it back (engine/rope.py apply_rope(inverse=True) of the rounded output, as the
separate rope kernel did: one launch fewer a layer).

Algorithm (flash-decoding): grid (head blocks, key splits, rows). Because all heads share the
keys, a program loads each key tile [BLOCK_N, D] once for BLOCK_H heads and scores it with
one tl.dot (q [BLOCK_H, D] x k^T); an fp32 online softmax (running max m, sum l) accumulates
p @ k [BLOCK_H, D]. The head blocks of one key split are adjacent program ids, so the tile
they share is read from DRAM once and from L2 by the others. With one split the kernel
applies the sink and writes the output itself; otherwise each split writes (acc, m, l) and
a small combine kernel merges the splits and adds the sink. Everything is static in shape:
no host sync, so the launcher can sit inside a CUDA graph.

Shapes: B rows, Hh heads, D latent (512), S pool slots, W ring slots (128), N entries per
slot, Kc selected entries (512 / all visible / 0), L = W + Kc keys, P key splits.
    q          [B, Hh, D]    bf16 (fp32 accepted for tests)
    window     [S, W, D]     q's dtype
    entries    [S, N, D]     q's dtype, or None
    slots, positions [B]     int64
    entry_idx  [B, Kc]       int64 (-1 = no entry), or None
    sink       [Hh]          fp32
    out        [B, Hh, D]    q's dtype
"""

from __future__ import annotations

import functools
import math

import torch

from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import rotate_pairs, round_bf16, wait_for_inputs
from engine.kernels._triton import cdiv, helper, jit, next_power_of_2, store_dtype
from engine.kernels.rmsnorm_rope import rope_reference

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------
# Reference (the oracle): engine/attention.py `_attend` over the same keys, batched over rows.
# ---------------------------------------------------------------------------------------------
def decode_attention_reference(
    q: torch.Tensor,
    window: torch.Tensor,
    entries: torch.Tensor | None,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    B, Hh, _ = q.shape
    W = window.shape[1]
    keys = window[slots]  # [B, W, D]
    ring = torch.arange(W, device=q.device)
    p = positions.unsqueeze(-1)
    allowed = (ring <= p) | (p >= W - 1)  # [B, W]
    if entries is not None and entry_idx is not None:
        chosen = entries[slots.unsqueeze(-1), entry_idx.clamp(min=0)]  # [B, Kc, D]
        keys = torch.cat([keys, chosen], dim=1)
        allowed = torch.cat([allowed, entry_idx >= 0], dim=1)
    # masked keys are zeroed, not only their scores: a ring slot or entry the sequence never
    # wrote may hold anything (a NaN of a fresh buffer, an earlier owner's values)
    kf = torch.where(allowed.unsqueeze(-1), keys.float(), 0.0)
    scores = torch.einsum("bhd,bmd->bhm", q.float(), kf) * softmax_scale
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    sink_logit = sink.float().view(1, Hh, 1).expand(B, Hh, 1)
    probs = torch.cat([scores, sink_logit], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bhm,bmd->bhd", probs, kf).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@jit
def _decode_attention_kernel(
    # pointers
    q_ptr,  # [B, Hh, D]
    window_ptr,  # [S, W, D]
    entries_ptr,  # [S, N, D] (window_ptr when there are no entries; never read then)
    slots_ptr,  # [B] int64
    pos_ptr,  # [B] int64
    idx_ptr,  # [B, Kc] int64
    sink_ptr,  # [Hh] f32
    out_ptr,  # [B, Hh, D]           written when ONE_SPLIT
    part_o_ptr,  # [B, P, Hh, D] f32  written otherwise
    part_ml_ptr,  # [B, P, Hh, 2] f32 (running max, sum) in the log2 domain
    cos_ptr,  # [B, R/2] f32 (ROPE only)
    sin_ptr,  # [B, R/2] f32 (ROPE only)
    # sizes
    num_heads,
    head_dim,
    window,
    num_sel,
    keys_per_split,
    qk_scale,  # softmax_scale * log2(e): the softmax runs on exp2
    rope_half,  # R/2 rotating pairs at the end of D (ROPE only)
    # strides (the last dim of q, window, entries, out is contiguous)
    stride_q_b,
    stride_q_h,
    stride_w_s,
    stride_w_w,
    stride_e_s,
    stride_e_n,
    stride_i_b,
    stride_o_b,
    stride_o_h,
    stride_c_b,
    # meta-parameters
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_ENTRIES: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    ROPE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # int64: row * stride can pass 2^31 in big pools
    num_splits = tl.num_programs(1)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < num_heads
    d_mask = offs_d < head_dim
    q = tl.load(
        q_ptr + pid_b * stride_q_b + offs_h[:, None] * stride_q_h + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    slot = tl.load(slots_ptr + pid_b).to(tl.int64)
    pos = tl.load(pos_ptr + pid_b)
    ring_len = tl.minimum(pos + 1, window)  # slots 0..p until the ring is full, then all W

    # a finite floor instead of -inf: a split whose keys are all masked keeps alpha = 1 and
    # p = exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    key_lo = pid_s * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, window + num_sel)
    for start in range(key_lo, key_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < key_hi
        valid = in_range & (offs_n < ring_len)
        k_ptrs = window_ptr + slot * stride_w_s + offs_n.to(tl.int64)[:, None] * stride_w_w
        k = tl.load(k_ptrs + offs_d[None, :], mask=valid[:, None] & d_mask[None, :], other=0.0)
        if HAS_ENTRIES:
            is_sel = in_range & (offs_n >= window)
            e = tl.load(idx_ptr + pid_b * stride_i_b + (offs_n - window), mask=is_sel, other=-1)
            e_ok = is_sel & (e >= 0)
            e_ptrs = entries_ptr + slot * stride_e_s + e.to(tl.int64)[:, None] * stride_e_n
            # the two masked loads are disjoint: a lane reads the ring or an entry, never both
            k += tl.load(e_ptrs + offs_d[None, :], mask=e_ok[:, None] & d_mask[None, :], other=0.0)
            valid = valid | e_ok
        if UPCAST_DOT:  # bf16 dots under the interpreter (see the launcher): same exact products
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(k.dtype)  # bf16 probabilities for the tensor-core p @ v, as FlashAttention
        if UPCAST_DOT:
            pv = tl.dot(p.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p, k, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if ONE_SPLIT:
        sink = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0) * 1.4426950408889634
        m = tl.maximum(m_i, sink)
        w = tl.exp2(m_i - m)
        denom = l_i * w + tl.exp2(sink - m)
        o = acc * (w / denom)[:, None]
        if ROPE:
            o = _inverse_rope(o, cos_ptr, sin_ptr, pid_b, stride_c_b, head_dim, rope_half,
                              BLOCK_H, BLOCK_D, ROUND_BF16)
        tl.store(
            out_ptr + pid_b * stride_o_b + offs_h[:, None] * stride_o_h + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
    else:
        row = (pid_b * num_splits + pid_s) * num_heads + offs_h  # [BLOCK_H] in [B, P, Hh]
        tl.store(
            part_o_ptr + row[:, None] * head_dim + offs_d[None, :],
            acc,
            mask=h_mask[:, None] & d_mask[None, :],
        )
        tl.store(part_ml_ptr + row * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=h_mask)


@jit
def _decode_attention_combine_kernel(
    part_o_ptr,  # [B, P, Hh, D] f32
    part_ml_ptr,  # [B, P, Hh, 2] f32
    sink_ptr,  # [Hh] f32
    out_ptr,  # [B, Hh, D]
    cos_ptr,  # [B, R/2] f32 (ROPE only)
    sin_ptr,  # [B, R/2] f32 (ROPE only)
    num_heads,
    head_dim,
    num_splits,
    rope_half,
    stride_o_b,
    stride_o_h,
    stride_c_b,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_h = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < num_splits
    d_mask = offs_d < head_dim
    row = (pid_b * num_splits + offs_p) * num_heads + pid_h  # [BLOCK_P]
    m_part = tl.load(part_ml_ptr + row * 2, mask=p_mask, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + row * 2 + 1, mask=p_mask, other=0.0)
    sink = tl.load(sink_ptr + pid_h) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m_part, axis=0), sink)
    w = tl.exp2(m_part - m_all)  # [BLOCK_P]
    denom = tl.sum(l_part * w, axis=0) + tl.exp2(sink - m_all)
    o = tl.load(
        part_o_ptr + row[:, None] * head_dim + offs_d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    o = tl.sum(o * w[:, None], axis=0) / denom
    if ROPE:
        o = tl.reshape(_inverse_rope(o[None, :], cos_ptr, sin_ptr, pid_b, stride_c_b, head_dim,
                                     rope_half, 1, BLOCK_D, ROUND_BF16), [BLOCK_D])
    tl.store(
        out_ptr + pid_b * stride_o_b + pid_h * stride_o_h + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


@helper
def _inverse_rope(o, cos_ptr, sin_ptr, row, stride_c_b, head_dim, rope_half,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    """o [ROWS, BLOCK_D] f32 of one row: rounded to the output dtype (the separate rope
    kernel read the stored bf16 output), then its last rope_half pairs turned back."""
    if ROUND_BF16:
        o = round_bf16(o)
    pair = tl.arange(0, BLOCK_D // 2)
    first = head_dim // 2 - rope_half  # the first rotating pair
    rot = (pair >= first) & (pair < head_dim // 2)
    k = tl.where(rot, pair - first, 0)
    cos = tl.load(cos_ptr + row * stride_c_b + k, mask=rot, other=1.0)[None, :]
    sin = -tl.load(sin_ptr + row * stride_c_b + k, mask=rot, other=0.0)[None, :]
    return rotate_pairs(o, cos, sin, rot, ROWS, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
# 32 heads x 16 keys with 8 warps: compiled for sm_90 (Triton 3.9, bench/kernels/
# compile_check.py) it takes 246 registers and no spill; 16 heads x 32 keys with 4 warps
# spills 528 bytes a thread, 32 x 32 spills 168, 64 heads spill 600+. 32 heads a program
# also halve the L2 re-reads of each key tile against 16. Not timed on a GPU yet:
# bench/kernels/decode_attention.py --tune times the alternatives.
DEFAULT_BLOCK_H = 32
DEFAULT_BLOCK_N = 16
DEFAULT_NUM_WARPS = 8
MAX_SPLITS = 16  # bounds the fp32 partials at B * 16 * Hh * D * 4 bytes (2 MiB at B = 1)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so CPU tests still take the split + combine path


def _num_splits(num_rows: int, head_blocks: int, num_keys: int, block_n: int, sms: int) -> int:
    """Key splits so the grid fills about one wave of SMs; never an empty split."""
    chunks = cdiv(num_keys, block_n)
    want = cdiv(sms, num_rows * head_blocks)
    splits = max(1, min(chunks, want, MAX_SPLITS))
    return cdiv(chunks, cdiv(chunks, splits))


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check(q, window, entries, slots, positions, entry_idx, sink) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hh, D], got shape {tuple(q.shape)}")
    B, Hh, D = q.shape
    if window.dim() != 3 or window.shape[2] != D:
        raise ValueError(f"window must be [S, W, {D}], got shape {tuple(window.shape)}")
    if window.dtype != q.dtype:
        raise ValueError(f"window dtype {window.dtype} differs from q's {q.dtype}")
    if (entries is None) != (entry_idx is None):
        raise ValueError("entries and entry_idx must both be given or both be None")
    if entries is not None:
        if entries.dim() != 3 or entries.shape[0] != window.shape[0] or entries.shape[2] != D:
            raise ValueError(
                f"entries must be [{window.shape[0]}, N, {D}], got shape {tuple(entries.shape)}"
            )
        if entries.dtype != q.dtype:
            raise ValueError(f"entries dtype {entries.dtype} differs from q's {q.dtype}")
        if entry_idx.dim() != 2 or entry_idx.shape[0] != B or entry_idx.dtype != torch.int64:
            raise ValueError(
                f"entry_idx must be int64 [{B}, Kc], got {entry_idx.dtype} {tuple(entry_idx.shape)}"
            )
    for name, t in (("slots", slots), ("positions", positions)):
        if t.shape != (B,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 [{B}], got {t.dtype} {tuple(t.shape)}")
    if sink.shape != (Hh,) or sink.dtype != torch.float32:
        raise ValueError(f"sink must be float32 [{Hh}], got {sink.dtype} {tuple(sink.shape)}")


def decode_attention(
    q: torch.Tensor,
    window: torch.Tensor,
    entries: torch.Tensor | None,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    softmax_scale: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """[B, Hh, D] attention output of one query per row (see the module docstring); with
    rope = (cos, sin) [B, R/2], rotated back by them."""
    _check(q, window, entries, slots, positions, entry_idx, sink)
    if rope is not None:
        cos, sin = rope
        if (cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != q.shape[0]
                or 2 * cos.shape[1] > q.shape[2] or q.shape[2] % 2
                or cos.dtype != torch.float32 or cos.stride(1) != 1
                or sin.stride() != cos.stride()):
            raise ValueError(f"rope must be fp32 cos, sin [{q.shape[0]}, R/2] with R <= "
                             f"{q.shape[2]} and contiguous rows, got {tuple(cos.shape)}, "
                             f"{tuple(sin.shape)}")  # fmt: skip
    if not use_triton(q):
        out = decode_attention_reference(
            q, window, entries, slots, positions, entry_idx, sink, softmax_scale
        )
        return out if rope is None else rope_reference(out, *rope, inverse=True)
    return launch(q, window, entries, slots, positions, entry_idx, sink, softmax_scale,
                  rope=rope)


def gathered_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_idx: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """q [B, Hh, D] over keys [M, D] shared by all rows, row b attending to keys
    key_idx[b] (int64 [B, L], -1 = none) -> [B, Hh, D]: a prefill chunk's attention, each
    query token a row (engine/attention.py's fast path). The decode kernel with no ring (an
    empty one-slot window, every ring key masked) and the keys as one slot's entries."""
    if keys.dim() != 2 or keys.shape[1] != q.shape[2]:
        raise ValueError(f"keys must be [M, {q.shape[2]}], got shape {tuple(keys.shape)}")
    B = q.shape[0]
    no_ring = keys.new_zeros(1, 1, keys.shape[1])
    rows = torch.zeros(B, dtype=torch.int64, device=q.device)  # every row reads slot 0
    return decode_attention(q, no_ring, keys.unsqueeze(0), rows, rows - 1, key_idx, sink,
                            softmax_scale)


def launch(
    q: torch.Tensor,
    window: torch.Tensor,
    entries: torch.Tensor | None,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    softmax_scale: float,
    *,
    block_h: int = DEFAULT_BLOCK_H,
    block_n: int = DEFAULT_BLOCK_N,
    num_splits: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The Triton path with its tile sizes exposed (tests force splits; the bench tunes)."""
    for name, t in (("q", q), ("window", window), ("entries", entries)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous (stride 1)")
    B, Hh, D = q.shape
    W = window.shape[1]
    has_entries = entries is not None and entry_idx.shape[1] > 0
    num_sel = entry_idx.shape[1] if has_entries else 0
    num_keys = W + num_sel
    head_blocks = cdiv(Hh, block_h)
    if num_splits is None:
        num_splits = _num_splits(B, head_blocks, num_keys, block_n, _num_sms(q.device))
    keys_per_split = cdiv(cdiv(num_keys, num_splits), block_n) * block_n
    num_splits = cdiv(num_keys, keys_per_split)
    one_split = num_splits == 1
    out = _empty((B, Hh, D), store_dtype(q.dtype, q.device), q.device)
    if B == 0:
        return out
    if one_split:
        part_o = part_ml = out  # not written
    else:
        part_o = _empty((B, num_splits, Hh, D), torch.float32, q.device)
        part_ml = _empty((B, num_splits, Hh, 2), torch.float32, q.device)
    ent = entries if has_entries else window
    idx = entry_idx if has_entries else slots
    block_d = next_power_of_2(D)
    # fp32 inputs (the tiny test model) get exact fp32 dots, not tf32; bf16 ones the default
    precision = "ieee" if q.dtype == torch.float32 else None
    # Triton's CPU interpreter multiplies bf16 tl.dot operands as their raw uint16 bits
    # (3.9 interpreter.py create_dot), so on the CPU the dots run on fp32 copies: bf16 x bf16
    # products are exact in fp32 either way, so the numerics are the GPU's
    cos, sin = rope if rope is not None else (sink, sink)  # never read without rope
    rope_half = rope[0].shape[1] if rope is not None else 0
    round_out = rope is not None and q.dtype == torch.bfloat16
    _decode_attention_kernel[(head_blocks, num_splits, B)](
        q, window, ent, slots, positions, idx, sink, out, part_o, part_ml, cos, sin,
        Hh, D, W, num_sel, keys_per_split, softmax_scale * LOG2E, rope_half,
        q.stride(0), q.stride(1), window.stride(0), window.stride(1),
        ent.stride(0), ent.stride(1), idx.stride(0), out.stride(0), out.stride(1),
        cos.stride(0),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_ENTRIES=has_entries, ONE_SPLIT=one_split, DOT_PRECISION=precision,
        UPCAST_DOT=not q.is_cuda, ROPE=rope is not None, ROUND_BF16=round_out,
        num_warps=num_warps, **pdl_launch(q),
    )  # fmt: skip
    if not one_split:
        _decode_attention_combine_kernel[(Hh, B)](
            part_o, part_ml, sink, out, cos, sin, Hh, D, num_splits, rope_half,
            out.stride(0), out.stride(1), cos.stride(0),
            BLOCK_P=next_power_of_2(num_splits), BLOCK_D=block_d, ROPE=rope is not None,
            ROUND_BF16=round_out, **pdl_launch(q),
        )  # fmt: skip
    return out.to(q.dtype)
