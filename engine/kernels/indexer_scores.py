"""Indexer scores for decode: how much each compressed entry matters to a row's query.

The ratio-4 layers' indexer (engine/attention.py `Indexer.select_row`) scores every visible
entry t of the row's pool slot s = slots[b] with one 128-d key per entry shared by its 64
heads, and the caller keeps the top 512 (a stable sort: ties to the earlier entry):

  scores[b, t] = sum_h w[b, h] * relu(q[b, h] . keys[s, t])   for t < (positions[b] + 1) // 4
               = -inf                                         otherwise
  w[b, h]      = fp32(weights[b, h]) * weight_scale   (weights_proj's bf16 output and the
                 indexer's constant: the decode step's cast and multiply, here for free)

Algorithm: grid (entry blocks of BLOCK_T, rows). A program scores BLOCK_T entries for all
heads with one tl.dot (q [Hi, Di] x k^T [Di, BLOCK_T], fp32 accumulation), then the ReLU,
the head weights and the sum over heads in registers. Blocks past the visible count store
-inf without reading their keys, so a short context reads only its own entries even though
the pool is sized for max_len. Static shapes, no host sync.

Precision: the dot runs in the keys' dtype; an fp32 q with bf16 keys is rounded to bf16
first. Under QAT (the released model) both sides are FP4 grid values times powers of two,
exact in bf16, so the products are exact and only the fp32 summation order differs from the
reference; without QAT, q's bf16 rounding (2^-9 relative) can move near-tied entries.

Shapes: B rows, Hi heads (64), Di head dim (128), S pool slots, N entries per slot.
    q        [B, Hi, Di]  fp32 or the keys' dtype     weights [B, Hi] f32 / bf16 / f16
    keys     [S, N, Di]   bf16 (fp32 in tests)        slots, positions [B] int64
    scores   [B, N]       f32
"""

from __future__ import annotations

import torch

from engine.config import RATIO_SPARSE
from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import wait_for_inputs
from engine.kernels._triton import cdiv, jit, next_power_of_2

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

BLOCK_T = 64  # 8192 entries -> 128 programs per row; q 16 KB + a 16 KB key tile per program


def indexer_scores_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    weights: torch.Tensor,
    ratio: int = RATIO_SPARSE,
    weight_scale: float = 1.0,
) -> torch.Tensor:
    """Indexer.select_row's scores, batched over rows (one query each)."""
    k = keys[slots].float()  # [B, N, Di]
    w = weights.float() * weight_scale
    scores = (torch.einsum("bhd,btd->bht", q.float(), k).relu() * w.unsqueeze(-1)).sum(1)
    visible = torch.arange(keys.shape[1], device=q.device) < ((positions + 1) // ratio)[:, None]
    return scores.masked_fill(~visible, float("-inf"))


@jit
def _indexer_scores_kernel(
    q_ptr,  # [B, Hi, Di]
    keys_ptr,  # [S, N, Di]
    slots_ptr,  # [B] int64
    pos_ptr,  # [B] int64
    w_ptr,  # [B, Hi] f32 / bf16 / f16
    out_ptr,  # [B, N] f32
    num_heads,
    head_dim,
    num_entries,
    ratio,
    weight_scale,
    stride_q_b,
    stride_q_h,
    stride_k_s,
    stride_k_n,
    stride_w_b,
    stride_o_b,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # int64: slot * stride passes 2^31 in big pools
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    num_visible = (tl.load(pos_ptr + pid_b) + 1) // ratio
    visible = offs_t < num_visible
    out = tl.full([BLOCK_T], float("-inf"), tl.float32)
    if pid_t * BLOCK_T < num_visible:  # blocks past the visible entries read nothing
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_mask = offs_h < num_heads
        d_mask = offs_d < head_dim
        slot = tl.load(slots_ptr + pid_b).to(tl.int64)
        q = tl.load(
            q_ptr + pid_b * stride_q_b + offs_h[:, None] * stride_q_h + offs_d[None, :],
            mask=h_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        k = tl.load(
            keys_ptr + slot * stride_k_s + offs_t.to(tl.int64)[:, None] * stride_k_n
            + offs_d[None, :],
            mask=visible[:, None] & d_mask[None, :],
            other=0.0,
        )  # fmt: skip
        q = q.to(k.dtype)
        if UPCAST_DOT:  # bf16 dots under the interpreter (see decode_attention.py)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_T]
        w = tl.load(w_ptr + pid_b * stride_w_b + offs_h, mask=h_mask, other=0.0)
        w = w.to(tl.float32) * weight_scale
        score = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
        out = tl.where(visible, score, float("-inf"))
    tl.store(out_ptr + pid_b * stride_o_b + offs_t, out, mask=offs_t < num_entries)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def indexer_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    weights: torch.Tensor,
    ratio: int = RATIO_SPARSE,
    weight_scale: float = 1.0,
) -> torch.Tensor:
    """scores [B, N] fp32, -inf past each row's visible entries (see the module docstring)."""
    if q.dim() != 3 or keys.dim() != 3 or keys.shape[2] != q.shape[2]:
        raise ValueError(
            f"q must be [B, Hi, Di] and keys [S, N, Di], got {tuple(q.shape)}, {tuple(keys.shape)}"
        )
    B, Hi, Di = q.shape
    if weights.shape != (B, Hi) or not weights.is_floating_point():
        raise ValueError(f"weights must be floating [{B}, {Hi}], got {weights.dtype} "
                         f"{tuple(weights.shape)}")  # fmt: skip
    for name, t in (("slots", slots), ("positions", positions)):
        if t.shape != (B,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 [{B}], got {t.dtype} {tuple(t.shape)}")
    if q.dtype not in (torch.float32, keys.dtype):
        raise ValueError(f"q must be float32 or the keys' dtype {keys.dtype}, got {q.dtype}")
    if not use_triton(q):
        return indexer_scores_reference(q, keys, slots, positions, weights, ratio, weight_scale)
    if q.stride(2) != 1 or keys.stride(2) != 1 or weights.stride(1) != 1:
        raise ValueError("q, keys and weights must have contiguous last dims")
    N = keys.shape[1]
    out = _empty((B, N), torch.float32, q.device)
    if B == 0 or N == 0:
        return out.fill_(float("-inf"))
    _indexer_scores_kernel[(cdiv(N, BLOCK_T), B)](
        q, keys, slots, positions, weights, out,
        Hi, Di, N, ratio, weight_scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), weights.stride(0), out.stride(0),
        BLOCK_H=max(16, next_power_of_2(Hi)), BLOCK_D=max(16, next_power_of_2(Di)),
        BLOCK_T=BLOCK_T,
        DOT_PRECISION="ieee" if keys.dtype == torch.float32 else None,
        UPCAST_DOT=not q.is_cuda, **pdl_launch(q),
    )  # fmt: skip
    return out
