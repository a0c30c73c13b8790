"""MoE routing on the device: scores, then the K experts and their weights, in one kernel
(`route`, the BF16 router of the release) or two (`router_scores` + `route_topk`).

_moe_router_kernel   x [N, H], W [E, H] (the gate's bf16 matrix) -> scores [N, E] fp32
                     = sqrt(softplus(x W^T))
_moe_topk_kernel     scores [N, E] (+ bias [E] | table tid2eid [V, K] and ids [N]) ->
                     experts [N, K] int64, weights [N, K] fp32, as engine.moe.Gate.pick:
                     the K largest of scores + bias, exact ties to the lower expert id (what
                     a stable descending sort gives), weights = the chosen unbiased scores,
                     normalised to sum 1 (norm_topk_prob), times routed_scaling_factor.
                     One program per token; replaces ~7 small PyTorch launches.
_moe_router_kernel   with TOPK: the last of a token's E / BLOCK_E programs to store its
                     scores (an arrival counter, engine/kernels/_counters.py) runs the same
                     top-k on them (read back from L2) and resets the counter: one launch a
                     layer fewer, the same bits (the same code on the same stored scores).

The reference (engine.moe.Gate.scores) is `F.softplus(F.linear(x.float(), W.float())).sqrt()`:
it converts the 256 x 4096 weight to fp32 on every call, 2 MB read + 4 MB written + 4 MB
read again per layer, a quarter of what the routed experts read at batch 1, plus three
launches. Here each program reads BLOCK_E rows of W once in their stored dtype, multiplies
in fp32 (bf16 x bf16 products are exact in fp32, so only the summation order differs from
the reference) and applies softplus and sqrt in the epilogue. Grid (N, E / BLOCK_E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import _device_math, pdl_launch, use_triton
from engine.kernels._counters import arrival_counters
from engine.kernels._triton import jitted_helper

try:  # optional: the base install has no Triton and takes the reference below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without the test extra
    triton = None

# 2 experts a program, their whole rows in one load: V4's E = 256 gives 128 programs a token,
# each with one DRAM round trip of 16 KB in flight. (8 experts x 512 columns, 32 programs
# that each walked H in 8 dependent steps, took 9.7 us a layer on an H100.)
BLOCK_E, MAX_BLOCK_K, NUM_WARPS = 2, 4096, 8


def _block_k(hidden: int) -> int:
    return min(triton.next_power_of_2(hidden), MAX_BLOCK_K)

if triton is not None:
    wait_for_inputs = jitted_helper(_device_math.wait_for_inputs)

    @triton.jit
    def _moe_router_kernel(
        x_ptr,       # [N, H] activations
        w_ptr,       # [E, H] router weight
        out_ptr,     # [N, E] fp32 scores (contiguous with TOPK)
        count_ptr,   # [N] int32 arrival counters, 0 between launches (TOPK only)
        bias_ptr, table_ptr, ids_ptr, experts_ptr, weights_ptr,  # the top-k's (TOPK only)
        E, H, K, V, scaling,
        stride_x_t, stride_w_e, stride_out_t,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, TOPK: tl.constexpr,
        HASH: tl.constexpr, NORM: tl.constexpr, BLOCK_ALL_E: tl.constexpr,
        BLOCK_TOPK: tl.constexpr, PDL: tl.constexpr = False,
    ):
        wait_for_inputs(PDL)
        token = tl.program_id(0).to(tl.int64)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = offs_e < E
        acc = tl.zeros([BLOCK_E, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < H
            x = tl.load(x_ptr + token * stride_x_t + offs_k, mask=k_mask, other=0.0)
            w = tl.load(w_ptr + offs_e[:, None].to(tl.int64) * stride_w_e + offs_k[None, :],
                        mask=e_mask[:, None] & k_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        z = tl.sum(acc, axis=1)
        # softplus as torch computes it (threshold 20), with log1p(u) ~ u (1 - u/2) where
        # 1 + u would round away u
        u = tl.exp(-tl.abs(z))
        log1p = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
        softplus = tl.where(z > 20.0, z, tl.maximum(z, 0.0) + log1p)
        tl.store(out_ptr + token * stride_out_t + offs_e, tl.sqrt(softplus), mask=e_mask)
        if TOPK:
            tl.debug_barrier()  # every thread's scores are stored before the release below
            arrived = tl.atomic_add(count_ptr + token, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:  # the token's last program: its top-k
                _topk_row(out_ptr, bias_ptr, table_ptr, ids_ptr, experts_ptr, weights_ptr,
                          token, E, K, V, scaling, HASH, NORM, BLOCK_ALL_E, BLOCK_TOPK)
                tl.atomic_xchg(count_ptr + token, 0)  # ready for the next launch


    @triton.jit
    def _topk_row(scores_ptr, bias_ptr, table_ptr, ids_ptr, experts_ptr, weights_ptr, token,
                  E, K, V, scaling,
                  HASH: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """Gate.pick for one token's stored scores (read from L2: other programs of the fused
        router may have written them)."""
        offs_e = tl.arange(0, BLOCK_E)
        offs_k = tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        scores = tl.load(scores_ptr + token * E + offs_e, mask=offs_e < E, other=0.0,
                         cache_modifier=".cg")
        if HASH:
            tid = tl.load(ids_ptr + token)
            # a token id outside the table picks no expert (id -1: a no-op downstream)
            tid_ok = offs_k < tl.where((tid >= 0) & (tid < V), K, 0)
            chosen = tl.load(table_ptr + tid * K + offs_k, mask=tid_ok, other=-1)
        else:
            biased = tl.load(bias_ptr + offs_e, mask=offs_e < E, other=0.0) + scores
            biased = tl.where(offs_e < E, biased, -float("inf"))
            chosen = tl.zeros([BLOCK_K], dtype=tl.int64)
            for k in range(0, K):  # K rounds of argmax: the first maximum wins a tie
                best = tl.argmax(biased, axis=0, tie_break_left=True)
                chosen = tl.where(offs_k == k, best.to(tl.int64), chosen)
                biased = tl.where(offs_e == best, -float("inf"), biased)
        # gather the chosen experts' unbiased scores from the row in registers
        picked = tl.sum(tl.where(offs_e[None, :] == chosen[:, None], scores[None, :], 0.0), axis=1)
        picked = tl.where(k_mask, picked, 0.0)
        if NORM:  # (a row with no expert keeps weights 0, not 0 / 0)
            total = tl.sum(picked, axis=0)
            picked = picked / tl.where(total > 0, total, 1.0)
        tl.store(experts_ptr + token * K + offs_k, chosen, mask=k_mask)
        tl.store(weights_ptr + token * K + offs_k, picked * scaling, mask=k_mask)

    @triton.jit
    def _moe_topk_kernel(
        scores_ptr,   # [N, E] fp32
        bias_ptr,     # [E] fp32 (learned routing)
        table_ptr,    # [V, K] int64 tid2eid (hash routing)
        ids_ptr,      # [N] int64 token ids (hash routing)
        experts_ptr,  # [N, K] int64 out
        weights_ptr,  # [N, K] fp32 out
        E, K, V, scaling,
        HASH: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        wait_for_inputs(PDL)
        _topk_row(scores_ptr, bias_ptr, table_ptr, ids_ptr, experts_ptr, weights_ptr,
                  tl.program_id(0).to(tl.int64), E, K, V, scaling,
                  HASH, NORM, BLOCK_E, BLOCK_K)


def route_topk(scores: torch.Tensor, k: int, scaling: float, norm: bool,
               bias: torch.Tensor | None = None, table: torch.Tensor | None = None,
               ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E] fp32 and either bias [E] (learned) or table [V, K] + ids [N] (hash) ->
    (weights [N, K] fp32, experts [N, K] int64), computed as engine.moe.Gate.pick does."""
    N, E = scores.shape
    if (bias is None) == (table is None) or (table is not None and ids is None):
        raise ValueError("route_topk: give bias (learned routing) or table and ids (hash)")
    if not use_triton(scores) or N == 0:
        raise ValueError("route_topk is the fast path only: use engine.moe.Gate.pick")
    scores = scores.contiguous()
    experts = torch.empty(N, k, dtype=torch.int64, device=scores.device)
    weights = torch.empty(N, k, dtype=torch.float32, device=scores.device)
    dummy = scores
    _moe_topk_kernel[(N,)](
        scores, dummy if bias is None else bias.float().contiguous(),
        dummy if table is None else table.contiguous(),
        dummy if ids is None else ids.contiguous(), experts, weights,
        E, k, 0 if table is None else table.shape[0], float(scaling),
        HASH=table is not None, NORM=norm, BLOCK_E=triton.next_power_of_2(E),
        BLOCK_K=triton.next_power_of_2(k), num_warps=4, **pdl_launch(scores),
    )
    return weights, experts


def router_scores_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.softplus(F.linear(x.float(), weight.float())).sqrt()


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, H], weight [E, H] dense -> sqrt(softplus(x W^T)) fp32 [N, E]; no host sync."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router: x {list(x.shape)} and weight {list(weight.shape)} must be "
                         "[N, H] and [E, H]")
    if not use_triton(x) or x.shape[0] == 0:
        return router_scores_reference(x, weight)
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("router: x and weight need unit stride along H")
    N, H = x.shape
    E = weight.shape[0]
    out = torch.empty(N, E, dtype=torch.float32, device=x.device)
    _moe_router_kernel[(N, triton.cdiv(E, BLOCK_E))](
        x, weight, out, out, out, out, out, out, out, E, H, 0, 0, 1.0,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_E=BLOCK_E, BLOCK_K=_block_k(H), TOPK=False, HASH=False, NORM=False,
        BLOCK_ALL_E=1, BLOCK_TOPK=1, num_warps=NUM_WARPS, **pdl_launch(x),
    )
    return out


def route(x: torch.Tensor, weight: torch.Tensor, k: int, scaling: float, norm: bool,
          bias: torch.Tensor | None = None, table: torch.Tensor | None = None,
          ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_scores + route_topk in one launch (the fast path only): x [N, H], weight
    [E, H] dense -> (weights [N, K] fp32, experts [N, K] int64) as engine.moe.Gate does."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router: x {list(x.shape)} and weight {list(weight.shape)} must be "
                         "[N, H] and [E, H]")
    if (bias is None) == (table is None) or (table is not None and ids is None):
        raise ValueError("route: give bias (learned routing) or table and ids (hash)")
    if not use_triton(x) or x.shape[0] == 0:
        raise ValueError("route is the fast path only: use engine.moe.Gate")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("router: x and weight need unit stride along H")
    N, H = x.shape
    E = weight.shape[0]
    scores = torch.empty(N, E, dtype=torch.float32, device=x.device)
    experts = torch.empty(N, k, dtype=torch.int64, device=x.device)
    weights = torch.empty(N, k, dtype=torch.float32, device=x.device)
    dummy = scores
    _moe_router_kernel[(N, triton.cdiv(E, BLOCK_E))](
        x, weight, scores, arrival_counters(x.device, N),
        dummy if bias is None else bias.float().contiguous(),
        dummy if table is None else table.contiguous(),
        dummy if ids is None else ids.contiguous(), experts, weights,
        E, H, k, 0 if table is None else table.shape[0], float(scaling),
        x.stride(0), weight.stride(0), scores.stride(0),
        BLOCK_E=BLOCK_E, BLOCK_K=_block_k(H), TOPK=True, HASH=table is not None, NORM=norm,
        BLOCK_ALL_E=triton.next_power_of_2(E), BLOCK_TOPK=triton.next_power_of_2(k),
        num_warps=NUM_WARPS, **pdl_launch(x),
    )
    return weights, experts
