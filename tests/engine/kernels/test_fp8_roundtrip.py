"""fp8_roundtrip_prefix (Triton) vs cat([engine.attention.fp8_roundtrip(x[:nope]), x[nope:]]).

Exact equality: every step of the kernel is exact (see the kernel file), so any difference is
a bug. Inputs: random rows at scales that put values in e4m3's normal and subnormal ranges,
ties at e4m3 midpoints (normal and subnormal, both parities), amax exactly 448 * 2^k (the
scale boundary) and just above it, all-zero blocks (the 1e-4 amax floor), bf16 and fp32.
CPU: TRITON_INTERPRET=1, D 192 (nope 128: two FP8 blocks and an unrounded tail); CUDA: the
real kv row (D 512, nope 448) and 32 rows.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import fp8_roundtrip
from engine.kernels import fp8_roundtrip as fr

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DIM, NOPE, ROWS = (512, 448, 32) if CUDA else (192, 128, 6)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fr, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def _reference(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fp8_roundtrip(x[..., :NOPE]), x[..., NOPE:]], -1)


def _check(x: torch.Tensor) -> None:
    got = fr.fp8_roundtrip_prefix(x, NOPE)
    want = _reference(x)
    bad = (got != want) & ~(got.isnan() & want.isnan())
    assert not bad.any(), (f"{int(bad.sum())} mismatches, first at {bad.nonzero()[:5].tolist()}: "
                           f"got {got[bad][:5].tolist()}, want {want[bad][:5].tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_rows_at_many_scales(triton_mode, dtype):
    g = torch.Generator().manual_seed(0)
    for scale in (1e-6, 3e-3, 1.0, 37.0, 1e5):
        x = torch.randn(ROWS, DIM, generator=g) * scale
        x[0] *= torch.rand(DIM, generator=g) ** 8  # a wide spread: subnormal e4m3 values
        _check(x.to(dtype).to(DEVICE))


def test_ties_boundaries_and_zero_blocks(triton_mode):
    x = torch.zeros(4, DIM)
    # block 0 of row 0: amax 448 (scale 1): e4m3 midpoints in the normal and subnormal ranges
    ties = torch.tensor([448.0, 1.0625, 1.1875, 17.0, 19.0, 2**-6 + 2**-10, 3 * 2**-10,
                         5 * 2**-10, 2**-10, 1.5 * 2**-10, 2**-11, 0.0, -1.0625, -3 * 2**-10,
                         232.0, 240.0, 440.0, 2**-7 + 2**-10, 2**-8 + 2**-10])
    x[0, : ties.numel()] = ties
    x[1, :64] = torch.linspace(-1, 1, 64) * 448 * 2**-3  # amax exactly 448 * 2^-3
    x[1, 64:128] = torch.linspace(-1, 1, 64) * 448 * 2**-3 * (1 + 2**-20)  # just above it
    x[2, 64:] = torch.randn(DIM - 64)  # row 2's first block stays zero (the 1e-4 floor)
    x[3] = torch.randn(DIM) * 1e-5  # below the floor: everything rounds to 2^-31 steps
    _check(x.to(DEVICE))
    _check(x.to(DEVICE).bfloat16())


def test_the_reference_mode_is_the_plain_formula():
    x = torch.randn(3, DIM, device=DEVICE)
    assert torch.equal(fr.fp8_roundtrip_prefix(x, NOPE), _reference(x))
    with pytest.raises(ValueError):
        from engine.kernels import mode
        with mode("triton"):
            fr.fp8_roundtrip_prefix(x, NOPE - 1)
