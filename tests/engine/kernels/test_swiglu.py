"""Shared-expert SwiGLU kernel (engine/kernels/swiglu.py) against its PyTorch reference.

Tolerance: both compute silu(g) * u in fp32 from the same inputs and round once; Triton's
sigmoid and torch's silu may differ by an fp32 ulp or two, which the final rounding hides in
bf16 but for a value at a rounding boundary (one bf16 ulp, 2^-8 relative); in fp32 a few ulps.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import mode
from engine.kernels.swiglu import swiglu, swiglu_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTER = 2048 if CUDA else 1500  # not a multiple of the block on the CPU


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2**-8), (torch.float32, 1e-6)])
def test_matches_the_reference(n, dtype, rtol):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    gu = (torch.randn(n, 2 * INTER, generator=g, device=DEVICE) * 4).to(dtype)
    want = swiglu_reference(gu)
    with mode("triton"):
        got = swiglu(gu)
    assert got.dtype == dtype and got.shape == (n, INTER)
    assert torch.allclose(got.float(), want.float(), rtol=rtol, atol=1e-6)
    # g and u are not swapped: silu(u) * g differs at far more than rounding
    swapped = swiglu_reference(torch.cat([gu[:, INTER:], gu[:, :INTER]], dim=1))
    assert not torch.allclose(got.float(), swapped.float(), rtol=0.1)


def test_rejects_an_odd_width():
    with mode("triton"), pytest.raises(ValueError, match=r"\[N, 2I\]"):
        swiglu(torch.zeros(2, 5, device=DEVICE))
