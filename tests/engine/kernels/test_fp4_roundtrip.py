"""fp4_roundtrip (Triton) vs engine.attention.fp4_roundtrip: exact equality (every step of
the kernel is exact, see the kernel file). Inputs: random rows at many scales, every e2m1
midpoint and grid value (both signs; a midpoint goes to the lower value), amax exactly
6 * 2^k and just above, all-zero blocks (the 1e-4 floor), fp32 and bf16. CPU:
TRITON_INTERPRET=1 at [3, 5, 128] (the tiny indexer); CUDA: [32, 64, 128]."""

from __future__ import annotations

import pytest
import torch

from engine.attention import fp4_roundtrip as reference
from engine.kernels import fp4_roundtrip as fr
from engine.kernels import mode

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (32, 64, 128) if CUDA else (3, 5, 128)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fr, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def _check(x: torch.Tensor) -> None:
    got, want = fr.fp4_roundtrip(x), reference(x)
    bad = got != want
    assert not bad.any(), (f"{int(bad.sum())} mismatches at {bad.nonzero()[:5].tolist()}: "
                           f"got {got[bad][:5].tolist()}, want {want[bad][:5].tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_rows_at_many_scales(triton_mode, dtype):
    g = torch.Generator().manual_seed(1)
    for scale in (1e-6, 1e-2, 1.0, 300.0):
        x = torch.randn(SHAPE, generator=g) * scale
        x[0, 0] *= torch.rand(SHAPE[-1], generator=g) ** 6
        _check(x.to(dtype).to(DEVICE))


def test_midpoints_grid_values_and_scale_boundaries(triton_mode):
    x = torch.zeros(SHAPE)
    pts = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0,
                        4.0, 0.2, 5.5, 0.0, -0.25, -2.5, -5.0, -6.0, 0.26, 4.9])
    x[0, 0, : pts.numel()] = pts  # amax 6: scale 1
    x[0, 1, :32] = torch.linspace(-6, 6, 32) * 2**-4  # amax exactly 6 * 2^-4
    x[0, 1, 32:64] = torch.linspace(-6, 6, 32) * 2**-4 * (1 + 2**-20)  # just above it
    x[0, 2, 32:] = torch.randn(SHAPE[-1] - 32)  # the first block stays zero
    _check(x.to(DEVICE))


def test_shape_errors_and_reference_mode():
    x = torch.randn(2, 48, device=DEVICE)
    with mode("triton"), pytest.raises(ValueError):
        fr.fp4_roundtrip(x)
    y = torch.randn(2, 64, device=DEVICE)
    assert torch.equal(fr.fp4_roundtrip(y), reference(y))
