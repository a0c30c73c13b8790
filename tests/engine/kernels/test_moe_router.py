"""MoE router scores kernel (engine/kernels/moe_router.py) against its PyTorch reference.

Tolerance: the kernel and F.linear add the same exact fp32 products (bf16 x bf16 fits fp32)
in different orders, a few fp32 ulps of sum |w x| (~1e-6 of the logit scale here); softplus
and sqrt keep relative errors, so 1e-5 relative to each score plus 1e-6 absolute (scores of
very negative logits are ~sqrt(exp(z))) holds with a wide margin and catches any wrong term.
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
    err = (got - want).abs()
    bound = 1e-5 * want.abs() + 1e-6
    assert (err <= bound).all(), f"worst {torch.nonzero(err > bound)[:8].tolist()}, max {err.max()}"


def test_router_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        router_scores(torch.randn(2, H), torch.randn(E, H + 1))
