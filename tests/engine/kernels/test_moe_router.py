"""MoE router scores kernel (engine/kernels/moe_router.py) against its PyTorch reference.

Tolerance: the kernel and F.linear add the same exact fp32 products (bf16 x bf16 fits fp32)
in different orders, a few fp32 ulps of sum |w x|; sqrt(softplus(z)) amplifies that where the
score is small. An absolute floor of 1e-6 did not hold on an H100 (2.4e-6 at H = 4096), so the
kernel is held to 4x torch's own fp32 error against an fp64 truth (plus 1e-6 relative):
still far below what any wrong term costs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import mode
from engine.kernels.moe_router import router_scores, router_scores_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
E, H = (256, 4096) if CUDA else (13, 300)  # odd sizes leave partial blocks on the CPU


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_scores_match_reference(N, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(N)
    x = torch.randn(N, H, generator=g, device=DEVICE).to(dtype)
    # logits over roughly [-60, 60]: both softplus branches (z > 20, and exp(z) below 1e-4)
    w = (torch.randn(E, H, generator=g, device=DEVICE) * 25 * H ** -0.5).to(dtype)
    want = router_scores_reference(x, w)
    z = F.linear(x.float(), w.float())
    assert (z > 20).any() and (z < -10).any()
    with mode("triton"):
        got = router_scores(x, w)
    assert got.dtype == torch.float32 and got.shape == (N, E)
    # Against an fp64 truth: the kernel sums the H products in another order than torch's
    # GEMM, and sqrt(softplus(z)) amplifies an fp32 rounding of z where the score is small
    # (d score / dz = sigmoid(z) / (2 score)). So the kernel may be as far from the truth as
    # torch's own fp32 result is, a few times over, and never by more than fp32 rounding of
    # the score itself beyond that.
    truth = F.softplus(x.double() @ w.double().T).sqrt()
    ref_err = (want.double() - truth).abs().max()
    err = (got.double() - truth).abs()
    bound = 4 * ref_err + 1e-6 * truth
    assert (err <= bound).all(), f"worst {torch.nonzero(err > bound)[:8].tolist()}, max {err.max()}"


def test_router_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        router_scores(torch.randn(2, H), torch.randn(E, H + 1))


@pytest.mark.parametrize("hash_routing", [False, True])
@pytest.mark.parametrize("N", [1, 4])
def test_route_topk_matches_gate_pick(hash_routing, N):
    """The kernel's experts equal Gate.pick's exactly, ties included (scores drawn from a few
    values, and row 0 tied everywhere), and its weights to fp32
    rounding (the normalising sum adds K values in another order: 1e-6 relative)."""
    from engine.config import ModelConfig
    from engine.kernels.moe_router import route_topk
    from engine.moe import Gate

    c = ModelConfig.tiny().replace(hidden_size=32, n_routed_experts=E if CUDA else 13,
                                   num_experts_per_tok=6 if CUDA else 3, num_hash_layers=1)
    with torch.device(DEVICE):
        gate = Gate(0 if hash_routing else 1, c, torch.bfloat16)
    g = torch.Generator(device=DEVICE).manual_seed(N + 10 * hash_routing)
    n_exp, k = c.n_routed_experts, c.num_experts_per_tok
    if hash_routing:
        ranks = torch.rand(c.vocab_size, n_exp, generator=g, device=DEVICE)
        gate.tid2eid.copy_(ranks.argsort(dim=-1)[:, :k])
    else:
        gate.bias.data = torch.randint(0, 3, (n_exp,), generator=g, device=DEVICE).float() / 4
    scores = torch.randint(1, 5, (N, n_exp), generator=g, device=DEVICE).float() / 4
    if not hash_routing:
        scores[0] = 1 - gate.bias  # row 0: every biased score equal, a tie at every rank
    ids = torch.randint(0, c.vocab_size, (N,), generator=g, device=DEVICE)
    want_w, want_e = gate.pick(scores, ids)
    if not hash_routing:  # the draw must contain ties at the top-k boundary
        biased = (scores + gate.bias).sort(dim=-1, descending=True).values
        assert (biased[:, k - 1] == biased[:, k]).any()
    with mode("triton"):
        got_w, got_e = route_topk(scores, k, c.routed_scaling_factor, c.norm_topk_prob,
                                  **({"table": gate.tid2eid, "ids": ids} if hash_routing
                                     else {"bias": gate.bias}))
    assert torch.equal(got_e, want_e), (got_e, want_e)
    assert torch.allclose(got_w, want_w, rtol=1e-6, atol=0), (got_w - want_w).abs().max()


def test_route_topk_out_of_table_token_picks_no_expert():
    """A token id past tid2eid gives expert -1 (a no-op in the routed kernels) and weight 0,
    not an out-of-bounds read or 0 / 0."""
    from engine.kernels.moe_router import route_topk

    table = torch.randint(0, 8, (50, 3), device=DEVICE)
    scores = torch.rand(2, 8, device=DEVICE) + 0.1
    ids = torch.tensor([50, 7], device=DEVICE)
    with mode("triton"):
        weights, experts = route_topk(scores, 3, 1.5, True, table=table, ids=ids)
    assert experts[0].tolist() == [-1, -1, -1] and weights[0].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(experts[1], table[7])
    want = scores[1, table[7]] / scores[1, table[7]].sum() * 1.5
    assert torch.allclose(weights[1], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("hash_routing", [False, True])
@pytest.mark.parametrize("N", [1, 4])
def test_fused_route_is_scores_then_topk(hash_routing, N):
    """route(): the last of a token's programs runs the top-k on the scores the others
    stored, so the result is route_topk(router_scores(x, w)) bit for bit; twice in a row
    (the arrival counters come back to 0) and with fresh inputs each time."""
    from engine.kernels import _counters
    from engine.kernels.moe_router import route, route_topk

    k = 6 if CUDA else 3
    g = torch.Generator(device=DEVICE).manual_seed(40 + N + 10 * hash_routing)
    w = (torch.randn(E, H, generator=g, device=DEVICE) * 4 * H ** -0.5).to(torch.bfloat16)
    pick = ({"table": torch.randint(0, E, (50, k), generator=g, device=DEVICE),
             "ids": torch.randint(0, 50, (N,), generator=g, device=DEVICE)} if hash_routing
            else {"bias": torch.rand(E, generator=g, device=DEVICE) / 10})
    for _ in range(2):
        x = torch.randn(N, H, generator=g, device=DEVICE).to(torch.bfloat16)
        with mode("triton"):
            want_w, want_e = route_topk(router_scores(x, w), k, 2.5, True, **pick)
            got_w, got_e = route(x, w, k, 2.5, True, **pick)
        assert torch.equal(got_e, want_e) and torch.equal(got_w, want_w)
        assert not _counters.arrival_counters(DEVICE, N).any()


def test_the_module_imports_after_another_kernel_jitted_the_shared_helpers():
    """moe_router jits its kernels at import and takes _device_math.wait_for_inputs through
    jitted_helper; when another kernel file's first launch has already bound the helpers
    (the name is then a JITFunction in _device_math), the import must still work (it
    raised TypeError on the GPU: the prefill's MoE imported the router after fp8_linear)."""
    import importlib

    from engine.kernels import _device_math, _triton, fp8_linear, moe_router

    fp8_linear._lazy.materialize()
    assert _device_math.wait_for_inputs in _triton._jitted_helpers.values()  # bound, jitted
    importlib.reload(moe_router)
    assert moe_router.wait_for_inputs is _device_math.wait_for_inputs
