"""engine/kernels/gguf_gemv.py: the Q8_0 / Q2_K / IQ2_XXS GEMV against the reference path
`F.linear(x, dequantize_ggml(W))` (itself equal to the gguf package's decoding,
tests/engine/test_gguf_formats.py). On CPU under TRITON_INTERPRET=1 at small odd shapes; on
CUDA also at V4-Flash's real shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import formats as fm
from engine.formats import WeightFormat
from engine.kernels import gguf_gemv as gg
from engine.linear import Linear
from tests.engine.kernels.conftest import DEVICE, ON_GPU, assert_close_verbose

FORMATS = [WeightFormat.Q8_0, WeightFormat.Q2_K, WeightFormat.IQ2_XXS]
# (N, K): odd and prime row counts; K one or two superblocks (Q8_0 also a 3-block K)
SMALL = [(37, 256), (1, 512), (17, 96)]
REAL = [(2048, 4096), (4096, 2048), (1024, 4096), (32768, 1024)]  # expert w1/w3, w2, wq_a, wq_b


def _weights(fmt: WeightFormat, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=g) * k**-0.5
    return fm.quantize_ggml(fmt, w).to(DEVICE)


def _tolerance(x: torch.Tensor, blocks: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Both sides multiply the same x.dtype-rounded weights and accumulate in fp32, in
    different orders: fp32 gives K * 2^-24 of sum |x w| (K <= 4096: ~2.5e-4, taken as 4e-4);
    a bf16 / fp16 output is also rounded once (2^-8 / 2^-11 of |y| <= sum |x w|)."""
    dense = fm.dequantize_ggml(fmt, blocks, x.dtype).float()
    scale = x.float().abs() @ dense.abs().T
    rel = {torch.float32: 4e-4, torch.bfloat16: 2**-8 + 4e-4, torch.float16: 2**-11 + 4e-4}
    return scale * rel[x.dtype] + 1e-6


def _check(fmt, n, k, m, dtype, seed, split_k=None):
    g = torch.Generator().manual_seed(seed)
    blocks = _weights(fmt, n, k, g)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    gg.pin_config(split_k=split_k)
    try:
        got = gg.ggml_linear(x, blocks, fmt)
    finally:
        gg.pin_config()
    # the reference path's operands (the weight rounded to x.dtype), multiplied in fp32: a
    # bf16 F.linear on CUDA may reduce in bf16, which the tolerance below does not cover
    want = F.linear(x.float(), fm.dequantize_ggml(fmt, blocks, x.dtype).float())
    assert got.shape == (m, n) and got.dtype == dtype
    assert torch.isfinite(got).all()  # every element written (outputs start NaN-poisoned)
    assert_close_verbose(got, want, _tolerance(x, blocks, fmt), f"{fmt.value} {m}x{n}x{k} {dtype}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3])
def test_matches_the_reference(fmt, m, triton_mode, poisoned_empty):
    for i, (n, k) in enumerate(SMALL):
        if k % fm.GGML_BLOCKS[fmt][0]:
            continue
        _check(fmt, n, k, m, torch.float32, seed=10 * i + m)
    _check(fmt, 37, 256, m, torch.bfloat16, seed=99 + m)


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_partials_sum_to_the_same(fmt, triton_mode, poisoned_empty):
    _check(fmt, 33, 512, 1, torch.float32, seed=5, split_k=3)  # 16 chunks: slices 6, 6, 4
    _check(fmt, 33, 512, 2, torch.float32, seed=6, split_k=16)


def test_linear_takes_the_kernel_for_ggml_weights(triton_mode, monkeypatch):
    g = torch.Generator().manual_seed(7)
    linear = Linear(256, 19, dtype=torch.float32)
    linear.load_ggml(WeightFormat.IQ2_XXS, _weights(WeightFormat.IQ2_XXS, 19, 256, g).cpu())
    linear.to(DEVICE)
    calls = []
    gg._lazy.materialize()  # jit first: the recorder wraps the jitted kernel, not the raw function
    real = gg._ggml_linear_kernel
    monkeypatch.setattr(gg, "_ggml_linear_kernel", _Recorder(real, calls))
    x = torch.randn(1, 256, generator=g).to(DEVICE)
    got = linear(x)
    assert calls, "Linear.forward did not launch the GGML kernel"
    assert_close_verbose(got, F.linear(x, linear.dense_weight(x.dtype)),
                         _tolerance(x, linear.weight, WeightFormat.IQ2_XXS), "Linear")


class _Recorder:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def test_refuses_blocks_of_the_wrong_shape():
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match=r"q2_k blocks for K=256 must be uint8 \[N, 84\]"):
        gg.ggml_linear(x, torch.zeros(4, 66, dtype=torch.uint8), WeightFormat.Q2_K)


@pytest.mark.skipif(not ON_GPU, reason="the real V4-Flash shapes run on the GPU")
@pytest.mark.parametrize("fmt", FORMATS)
def test_real_shapes_on_the_gpu(fmt, triton_mode, poisoned_empty):
    for i, (n, k) in enumerate(REAL):
        for m in (1, 8):
            _check(fmt, n, k, m, torch.bfloat16, seed=100 + i * 10 + m)


def test_grouped_matches_the_grouped_reference(triton_mode, poisoned_empty):
    """attention's wo_a: group g of x meets rows g*N..(g+1)*N (the einsum of Attention)."""
    g = torch.Generator().manual_seed(11)
    groups, n, k = 3, 5, 256
    blocks = _weights(WeightFormat.Q8_0, groups * n, k, g)
    x = torch.randn(2, groups, k, generator=g).to(DEVICE)
    got = gg.ggml_linear_grouped(x, blocks, WeightFormat.Q8_0)
    dense = fm.dequantize_ggml(WeightFormat.Q8_0, blocks, x.dtype).view(groups, n, k)
    want = torch.einsum("mgk,gnk->mgn", x, dense)
    tol = torch.einsum("mgk,gnk->mgn", x.abs(), dense.abs()) * 4e-4 + 1e-6
    assert_close_verbose(got, want, tol, "grouped")
