"""rmsnorm_rope / rope (Triton) vs their references (engine/rope.py apply_rope after the
RMSNorm of engine/attention.py), at attention's q, kv and output shapes.

CPU: TRITON_INTERPRET=1 at D 96 (32 unrotated + 64 rotated channels: not a power of two),
5 heads (a partial head block) or none (kv). CUDA: D 512, R 64, 64 heads, N up to 32.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import RMSNorm
from engine.kernels import mode
from engine.kernels import rmsnorm_rope as rr
from engine.rope import apply_rope
from tests.engine.kernels._allclose import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DIM, ROPE, HEADS, TOKENS = (512, 64, 64, 32) if CUDA else (96, 64, 5, 3)
EPS = 1e-6


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        rr,
        "_empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def make_case(n: int, heads: int | None, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (n, DIM) if heads is None else (n, heads, DIM)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    angles = torch.rand(n, ROPE // 2, generator=g) * 100
    weight = (1 + 0.1 * torch.randn(DIM, generator=g)).to(DEVICE, dtype)
    return x, weight, angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if dtype == torch.float32:  # fp32 throughout; rsqrt vs 1/sqrt and FMA contraction only
        assert_close(got, want, name=name, atol=1e-5, rtol=1e-5)
        return
    # bf16: the same fp32 math and the same round-to-nearest-even points as the reference,
    # so outputs are equal except where an fp32 ulp of rstd flips a rounding: one bf16 ulp
    # (2^-7 relative) of a normed value, which the rotation carries to at most ~2 ulps of
    # an O(1) output; such flips must stay rare
    assert_close(got, want, name=name, atol=2**-6, rtol=2**-7)
    differ = (got != want).float().mean().item()
    assert differ < 0.01, f"{name}: {differ:.2%} of elements differ from the reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [None, HEADS])
@pytest.mark.parametrize("weighted", [False, True])
def test_rmsnorm_rope_matches_reference(weighted: bool, heads, dtype: torch.dtype) -> None:
    x, weight, cos, sin = make_case(TOKENS, heads, dtype, seed=2 * weighted + (heads is None))
    weight = weight if weighted else None
    want = rr.rmsnorm_rope_reference(x, weight, cos, sin, EPS)
    with mode("triton"):
        got = rr.rmsnorm_rope(x, weight, cos, sin, EPS)
    assert got.shape == x.shape and got.dtype == dtype
    check(got, want, dtype, "rmsnorm_rope")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_matches_reference(inverse: bool, dtype: torch.dtype) -> None:
    x, _, cos, sin = make_case(TOKENS, HEADS, dtype, seed=7 + inverse)
    want = rr.rope_reference(x, cos, sin, inverse)
    with mode("triton"):
        got = rr.rope(x, cos, sin, inverse)
    check(got, want, dtype, "rope")


def test_reference_is_attentions_formula() -> None:
    """kv: RMSNorm module then apply_rope; q: the weightless per-head norm then apply_rope."""
    x, weight, cos, sin = make_case(TOKENS, None, torch.bfloat16, seed=3)
    norm = RMSNorm(DIM, EPS).to(DEVICE)
    norm.weight.data.copy_(weight)
    assert torch.equal(rr.rmsnorm_rope_reference(x, weight, cos, sin, EPS),
                       apply_rope(norm(x), cos, sin))  # fmt: skip
    q, _, cos, sin = make_case(TOKENS, HEADS, torch.bfloat16, seed=4)
    qf = q.float()
    want = apply_rope((qf * torch.rsqrt(qf.square().mean(-1, keepdim=True) + EPS)).to(q.dtype),
                      cos.unsqueeze(1), sin.unsqueeze(1))  # fmt: skip
    assert torch.equal(rr.rmsnorm_rope_reference(q, None, cos, sin, EPS), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_matches_module(dtype: torch.dtype) -> None:
    """The plain norm (no rotating channels) over a hidden-size row, leading dims [B, T]."""
    hidden = 4096 if CUDA else 200
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 3, hidden, generator=g) * 5).to(DEVICE, dtype)
    norm = RMSNorm(hidden, EPS, dtype).to(DEVICE)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    with mode("triton"):
        got = rr.rmsnorm(x, norm.weight, EPS)
    with mode("reference"):
        assert torch.equal(rr.rmsnorm(x, norm.weight, EPS), norm(x))
    check(got, norm(x), dtype, "rmsnorm")


def test_rope_inverse_undoes_rope() -> None:
    x, _, cos, sin = make_case(TOKENS, HEADS, torch.float32, seed=9)
    with mode("triton"):
        back = rr.rope(rr.rope(x, cos, sin), cos, sin, inverse=True)
    assert_close(back, x, name="rope then inverse", atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs() -> None:
    x, weight, cos, sin = make_case(TOKENS, HEADS, torch.float32, seed=0)
    with mode("triton"):
        with pytest.raises(ValueError, match="cos and sin must be"):
            rr.rmsnorm_rope(x, weight, cos[:-1], sin[:-1], EPS)
        with pytest.raises(ValueError, match="weight must be"):
            rr.rmsnorm_rope(x, weight[:-1], cos, sin, EPS)
        with pytest.raises(ValueError, match="x must be bf16 or fp32"):
            rr.rope(x.half(), cos, sin)
