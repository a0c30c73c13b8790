"""Top-k of the indexer scores without a sort: the entries a ratio-4 layer attends to.

Per row b of scores [B, N] (fp32, -inf = entry not visible yet), choose the k (512) largest
finite scores; an exact tie goes to the lower entry index, as the reference's stable
descending sort (Indexer.select_row) decides it. Returns idx [B, min(k, N)] int64: the
chosen entry indices in ASCENDING order (attention does not depend on the order), -1 in
the slots past the row's count when fewer than k entries are visible.

Algorithm (radix select, one program per row, the row in registers): map each score to an
unsigned key with the same order (sign bit flipped for x >= 0, all bits flipped for x < 0;
-0.0 first made +0.0 so it ties with +0.0 as in a float compare); find the k-th largest
key T bit by bit from the top (32 counting passes over the row); take every key > T and,
of the keys == T, the first k - count(> T) by index (a prefix sum); write them compacted by
a second prefix sum. One launch, no host sync, no sort; torch's stable sort of [B, 8192] is
several kernels.

Shapes: B rows, N entries (<= 32768 here; longer rows take the reference), k selected.
"""

from __future__ import annotations

import torch

from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import wait_for_inputs
from engine.kernels._triton import jit, next_power_of_2

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

MAX_ENTRIES = 32768  # a row in one program's registers: 128K context at ratio 4


def indexer_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The decode step's rule: stable descending sort, first k, -inf -> -1 (best first)."""
    k = min(k, scores.shape[1])
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    return torch.where(vals[:, :k] == float("-inf"), -1, idx[:, :k])


@jit
def _indexer_topk_kernel(
    scores_ptr,  # [B, N] f32
    out_ptr,  # [B, K] int64
    num_entries,
    k,
    stride_s_b,
    stride_o_b,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    x = tl.load(scores_ptr + pid_b * stride_s_b + offs, mask=offs < num_entries,
                other=float("-inf"))  # fmt: skip
    finite = x > float("-inf")  # NaN is not chosen either
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in the reference's compare
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 0, bits | 0x80000000, ~bits)  # same order as x, unsigned
    key = tl.where(finite, key, 0)  # below every finite score's key (-inf's is 0x007FFFFF)

    # T = the k-th largest key: the largest value with at least k keys >= it
    thresh = tl.sum(tl.zeros([BLOCK_N], tl.uint32), axis=0)  # a uint32 scalar 0
    for bit in tl.static_range(31, -1, -1):
        cand = thresh | (1 << bit)
        count = tl.sum((key >= cand).to(tl.int32), axis=0)
        thresh = tl.where(count >= k, cand, thresh)
    greater = finite & (key > thresh)
    equal = finite & (key == thresh)
    eq_rank = tl.cumsum(equal.to(tl.int32), axis=0) - equal.to(tl.int32)  # exclusive
    need = k - tl.sum(greater.to(tl.int32), axis=0)
    # fewer than k finite: no candidate reaches k, T stays 0 and `greater` is every finite one
    chosen = greater | (equal & (eq_rank < need))

    chosen_i = chosen.to(tl.int32)
    slot = tl.cumsum(chosen_i, axis=0) - chosen_i  # where each chosen entry goes
    row_out = out_ptr + pid_b * stride_o_b
    tl.store(row_out + slot, offs.to(tl.int64), mask=chosen)
    num_chosen = tl.sum(chosen_i, axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    pad = tl.full([BLOCK_K], -1, tl.int64)
    tl.store(row_out + offs_k, pad, mask=(offs_k >= num_chosen) & (offs_k < k))


def _num_warps(block_n: int) -> int:
    """8 keys a thread: a row of 8192 on 32 warps takes 53 registers on sm_90 and no spill;
    on 8 warps it spills (compile_check.py). Longer rows spill some (16384: 184 bytes)."""
    return min(32, max(4, block_n // 256))


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def indexer_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """idx [B, min(k, N)] int64, ascending; -1 past each row's visible count."""
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [B, N], got {scores.dtype} {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    B, N = scores.shape
    if not use_triton(scores) or N > MAX_ENTRIES:
        return _ascending(indexer_topk_reference(scores, k))
    if scores.stride(1) != 1:
        raise ValueError("scores must have a contiguous last dim")
    k = min(k, N)
    out = _empty((B, k), torch.int64, scores.device)
    if B == 0 or k == 0:
        return out
    block_n = next_power_of_2(N)
    _indexer_topk_kernel[(B,)](
        scores, out, N, k, scores.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=next_power_of_2(k), num_warps=_num_warps(block_n),
        **pdl_launch(scores),
    )  # fmt: skip
    return out


def _ascending(idx: torch.Tensor) -> torch.Tensor:
    """The reference's selection in the kernel's order: ascending indices, -1 last."""
    big = torch.iinfo(torch.int64).max
    return (
        torch.where(idx < 0, big, idx)
        .sort(dim=-1)
        .values.masked_fill_(
            torch.arange(idx.shape[1], device=idx.device) >= (idx >= 0).sum(-1, keepdim=True), -1
        )
    )
