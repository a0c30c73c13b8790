"""Grouped (prefill) routed-expert kernels (engine/kernels/grouped_experts.py) against plain
PyTorch, their tile plan's invariants, and the MoE block's prefill path against its loop.

On the CPU the kernels run in Triton's interpreter at tiny shapes; with CUDA at V4-Flash's
(H 4096, I 2048, E 256, K 6), with a prefill chunk's worth of tokens.

The reference is engine.moe's loop over one expert at a time (`loop_reference`): the same
rounding points, fp32 sums in another order, so the decode kernels' tolerances apply
(test_routed_experts.py says why). fp32 runs use tl.dot's IEEE mode, so FP32_TOL holds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import moe as moe_mod
from engine.formats import WeightFormat
from engine.kernels import mode
from engine.kernels.grouped_experts import _parse_config, grouped_experts, plan_tiles
from engine.kernels.routed_experts import dequantize_rows
from tests.engine.kernels.test_routed_experts import (
    BF16_TOL,
    CUDA,
    DEVICE,
    FORMATS,
    FP32_TOL,
    LIMIT,
    SHAPES,
    assert_close,
    copy,
    load_random_moe,
    moe_config,
    routing,
    stack_for,
)

# tokens of a prefill: a chunk on CUDA (~48 pairs per expert, several tiles each); on the
# CPU enough for several tiles per expert at the interpreter's BLOCK_M 16
TOKENS = (2048, 100) if CUDA else (40, 7)


def loop_reference(x, experts, weights, stack, limit=LIMIT) -> torch.Tensor:
    """engine.moe's prefill loop over a stack, one expert at a time (the per-pair reference
    would hold a dequantised expert copy per pair: 100 MB each at the real shapes): each
    used expert's weights dequantised exactly and rounded to x.dtype, as `dense_weight`
    does; g, u, h and each pair's output rounded to x.dtype; the K outputs summed in fp32."""
    N, H = x.shape
    K, inter = experts.shape[1], stack.inter
    parts = torch.zeros(N, K, H, dtype=torch.float32, device=x.device)
    valid = (experts >= 0) & (experts < stack.num_experts)
    for e in torch.unique(experts[valid]).tolist():
        t, k = torch.where(experts == e)
        idx = torch.tensor([e], device=x.device)
        w13 = dequantize_rows(stack, "w13", idx)[0].to(x.dtype).float()
        w2 = dequantize_rows(stack, "w2", idx)[0].to(x.dtype).float()
        gu = (x[t].float() @ w13.T).to(x.dtype).float()
        g, u = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        h = (F.silu(g) * u * weights[t, k].float().unsqueeze(-1)).to(x.dtype).float()
        parts[t, k] = (h @ w2.T).to(x.dtype).float()
    return parts.sum(dim=1)


def run_grouped(x, experts, weights, stack, limit=LIMIT) -> torch.Tensor:
    with mode("triton"):
        y = grouped_experts(x, experts, weights, stack, limit)
    assert torch.isfinite(y).all()
    return y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_reference(fmt, N, dtype):
    stack = stack_for(fmt)
    E, K, H, _ = SHAPES[fmt]
    g = torch.Generator(device=DEVICE).manual_seed(300 + N)
    x = (torch.randn(N, H, generator=g, device=DEVICE) * 2).to(dtype)
    experts, weights = routing(N, E, K, g)
    want = loop_reference(x, experts, weights, stack)
    rel = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_close(run_grouped(x, experts, weights, stack), want, rel, f"{fmt} N={N} {dtype}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_expert_takes_every_token_and_invalid_ids_add_nothing(fmt):
    """Slot 0 of every token on expert 1 (one group of many tiles), one slot of some tokens
    an invalid id (-1 or E: padded rows) which must contribute exactly nothing, and the
    experts nobody uses NaN-poisoned, which would show if any tile read them."""
    E, K, H, _ = SHAPES[fmt]
    N = TOKENS[0]
    stack = stack_for(fmt)
    g = torch.Generator(device=DEVICE).manual_seed(11)
    x = torch.randn(N, H, generator=g, device=DEVICE).bfloat16()
    experts, weights = routing(N, E, K, g)
    experts[:, 0] = 1
    experts[:, 1:] = torch.where(experts[:, 1:] == 1, 2, experts[:, 1:])
    experts[::3, K - 1] = -1
    experts[1::3, K - 1] = E
    used = torch.unique(experts[(experts >= 0) & (experts < E)])
    poisoned = _poison_unused(stack, used)
    want = loop_reference(x, experts, weights, stack_for(fmt))
    assert_close(run_grouped(x, experts, weights, poisoned), want, BF16_TOL, f"{fmt} one expert")


def _poison_unused(stack, used: torch.Tensor):
    """A copy of `stack` whose experts outside `used` decode to NaN: NaN weights (DENSE),
    NaN fp16 scales (INT2), E8M0 byte 255 = inf scales (FP4; inf * a 0 code = NaN)."""
    from dataclasses import replace

    unused = torch.ones(stack.num_experts, dtype=torch.bool, device=stack.w13.device)
    unused[used] = False

    def poison(t, value):
        out = copy(t)
        (out.view(torch.uint8) if value == 255 else out)[unused] = value
        return out

    if stack.format == WeightFormat.DENSE:
        return replace(stack, w13=poison(stack.w13, float("nan")), w2=poison(stack.w2, float("nan")))
    bad = float("nan") if stack.format == WeightFormat.INT2 else 255
    return replace(stack, scale13=poison(stack.scale13, bad), scale2=poison(stack.scale2, bad))


def test_plan_covers_every_valid_pair_once():
    """Invariants of the tile plan: each tile holds one expert's pairs, the tiles together
    hold every valid pair exactly once, and none holds an invalid one."""
    g = torch.Generator().manual_seed(5)
    E, K, N = 9, 3, 50
    experts = torch.randint(-1, E + 1, (N, K), generator=g)
    experts[:10] = 4  # one expert with several tiles
    for block_m in (1, 4, 16):
        order, tile_expert, tile_row, tile_len = plan_tiles(experts, E, block_m)
        flat = experts.reshape(-1)
        seen = []
        for t in range(tile_expert.numel()):
            n = int(tile_len[t])
            assert 0 <= n <= block_m
            if n == 0:
                continue
            pairs = order[int(tile_row[t]): int(tile_row[t]) + n]
            assert (flat[pairs] == int(tile_expert[t])).all()
            seen += pairs.tolist()
        valid = ((flat >= 0) & (flat < E)).nonzero().flatten().tolist()
        assert sorted(seen) == valid


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_wide_variant_matches_too(fmt, monkeypatch):
    """WIDE=1 (one tl.dot a block of words, K = BLOCK_K) pinned, so it is what runs."""
    import engine.kernels.grouped_experts as ge

    block_k = 64 if not CUDA else 128
    monkeypatch.setenv(ge.CONFIG_ENV, f"BLOCK_M=16,BLOCK_N=64,BLOCK_K={block_k},num_warps=4,"
                                      "num_stages=2,WIDE=1")
    monkeypatch.setattr(ge, "_BEST", {})
    stack = stack_for(fmt)
    E, K, H, _ = SHAPES[fmt]
    N = TOKENS[1]
    g = torch.Generator(device=DEVICE).manual_seed(77)
    x = (torch.randn(N, H, generator=g, device=DEVICE) * 2).bfloat16()
    experts, weights = routing(N, E, K, g)
    want = loop_reference(x, experts, weights, stack)
    assert_close(run_grouped(x, experts, weights, stack), want, BF16_TOL, f"{fmt} WIDE")


def test_config_pin_is_checked():
    assert _parse_config("BLOCK_M=32,BLOCK_N=64,BLOCK_K=256,num_warps=4,num_stages=2")["BLOCK_M"] == 32
    assert _parse_config("BLOCK_M=32,BLOCK_N=64,BLOCK_K=64,num_warps=4,num_stages=2,WIDE=1")["WIDE"]
    for bad in ("BLOCK_M=32", "BLOCK_M=8,BLOCK_N=64,BLOCK_K=256,num_warps=4,num_stages=2",
                "BLOCK_M=32,BLOCK_N=64,BLOCK_K=128,num_warps=4,num_stages=2", "SPLIT=2",
                "BLOCK_M=32,BLOCK_N=64,BLOCK_K=96,num_warps=4,num_stages=2,WIDE=1"):
        with pytest.raises(ValueError):
            _parse_config(bad)


@pytest.mark.parametrize("layer_id", [0, 3])
def test_moe_prefill_takes_the_grouped_path_and_matches_the_loop(layer_id, monkeypatch):
    """The MoE block given more tokens than its GEMV path takes (a prefill chunk): the fast
    path (grouped kernels) against the reference loop, INT2 experts, bf16; layer 0 routes
    by the hash table, layer 3 by the learned gate."""
    import engine.kernels.grouped_experts as ge

    calls = []
    real = ge.grouped_experts
    monkeypatch.setattr(ge, "grouped_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    block = load_random_moe(WeightFormat.INT2, layer_id, torch.bfloat16, seed=51 + layer_id)
    N = moe_mod.FAST_MAX_TOKENS + 9
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(1, N, moe_config(WeightFormat.INT2).hidden_size, generator=g,
                    device=DEVICE).bfloat16()
    ids = torch.randint(0, 129280, (1, N), generator=g, device=DEVICE)
    with mode("reference"):
        want = block(x, ids)
    with mode("triton"):
        got = block(x, ids)
    assert calls, "the prefill-sized batch did not take the grouped kernels"
    assert_close(got.float(), want.float(), BF16_TOL, f"MoE prefill layer {layer_id}")
