"""cache_rows (Triton) vs the unfused reference chain (rmsnorm_rope / rope, then the QAT round
trip, then the index_put), at the decode step's four row kinds.

CPU: TRITON_INTERPRET=1 at the tiny configuration's sizes (D 128, R 64, so the FP8 prefix is
one 64-block; 5 query heads: a partial block of 4 rows). CUDA: the real ones (kv and
entries D 512 with a 448-channel FP8 prefix, indexer D 128, 64 query heads), 32 tokens.

Tolerances, by what can differ: the kernel computes the reference's fp32 formulas, but its
sums (the norm's, the Hadamard's) run in another order and the compiler may contract a
multiply-add, so a value can move by an fp32 ulp. Where a bf16 or QAT rounding follows, such
a move flips the rounding only for a value within an ulp of a midpoint: then the result is
one step of that grid away (bf16: 2^-8 relative; e4m3: 2^-3 of the value; e2m1: at most 2
units of the block scale, i.e. amax / 3). The checks allow exactly such one-step moves and
require them to be rare (under 1% of elements, where random data puts ~0.1%); everything
else is equal bit for bit, and untouched pool rows keep their poison.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cache_rows as cr
from engine.kernels import mode
from tests.engine.kernels.conftest import DEVICE, ON_GPU

D_KV, NOPE_KV, D_IX, ROPE = (512, 448, 128, 64) if ON_GPU else (128, 64, 128, 64)
TOKENS, QUERY_HEADS = (32, 64) if ON_GPU else (3, 5)
SLOTS, ROWS_PER_SLOT = 6, 9
EPS = 1e-6


def make(n: int, shape_tail: tuple[int, ...], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, *shape_tail), generator=g) * 3).to(DEVICE, dtype)
    angles = torch.rand(n, ROPE // 2, generator=g) * 100
    weight = (1 + 0.1 * torch.randn(shape_tail[-1], generator=g)).to(DEVICE, dtype)
    return x, weight, angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def destinations(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (slot, row) pairs, as the decode step's rows have."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(SLOTS * ROWS_PER_SLOT, generator=g)[:n]
    return (flat // ROWS_PER_SLOT).to(DEVICE), (flat % ROWS_PER_SLOT).to(DEVICE)


def assert_one_step_moves(got: torch.Tensor, want: torch.Tensor, step: torch.Tensor, name: str,
                          coarse: torch.Tensor | None = None):
    """got == want except elements at most one grid step (`step`, per element) away, rare
    among the `coarse` ones (those a bf16 / QAT rounding ends; default all: an fp32 result
    moves by ulps wherever rstd did); NaN never passes."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an unwritten element?)"
    diff = (got.double() - want.double()).abs()
    moved = diff > 0
    too_far = diff > step.double() * (1 + 2**-20)
    assert not too_far.any(), (f"{name}: {int(too_far.sum())} elements move more than one "
                               f"grid step, first at {too_far.nonzero()[:3].tolist()}: got "
                               f"{got[too_far][:3].tolist()} want {want[too_far][:3].tolist()}")
    if coarse is None:
        coarse = torch.ones_like(moved)
    if not coarse.any():
        return
    share = moved[coarse.expand_as(moved)].float().mean().item()
    assert share < 0.01, f"{name}: {share:.2%} of elements differ from the reference"


def fp32_step(want: torch.Tensor) -> torch.Tensor:
    """fp32 throughout: a few ulps of the row's O(1) scale (a rotation can cancel to a value
    far below its inputs, which keep their absolute rounding)."""
    w = want.double().abs()
    return 2.0**-20 * (w + w.amax(-1, keepdim=True))


def bf16_step(want: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp of each value (2^-7 of its binade; the subnormal floor for zeros)."""
    w = want.double().abs().clamp(min=2.0**-126)
    return 2.0 ** (torch.floor(torch.log2(w)) - 7)


def fp8_step(want: torch.Tensor, nope: int, in_dtype: torch.dtype) -> torch.Tensor:
    """e4m3 keeps 3 mantissa bits: one step is 2^-3 of the value's binade, x2 for a block
    whose amax crossed a power of two (its scale doubled), and at least the subnormal step
    2^-9 of the block scale (<= amax / 224); channels past nope: the bf16 / fp32 rounding."""
    w = want.double().abs()
    step = 2.0 ** (torch.floor(torch.log2(w.clamp(min=2.0**-60))) - 2)
    amax = w[..., :nope].unflatten(-1, (-1, 64)).amax(-1, keepdim=True)
    floor = (amax * 2.0**-16).expand(*amax.shape[:-1], 64).flatten(-2)
    out = bf16_step(want) if in_dtype == torch.bfloat16 else fp32_step(want)
    out[..., :nope] = torch.maximum(step[..., :nope], floor)
    return out


def fp4_step(want: torch.Tensor) -> torch.Tensor:
    """e2m1's widest gap (4 -> 6) is 2 units of the block's scale, amax / 6 rounded up to a
    power of two (< amax / 3): one step is below 2 amax / 3 of the 32-block."""
    blocks = want.double().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    return (amax * 2 / 3).expand_as(blocks).flatten(-2)


def poisoned_pool(dtype: torch.dtype, d: int) -> torch.Tensor:
    return torch.full((SLOTS, ROWS_PER_SLOT, d), float("nan"), dtype=dtype, device=DEVICE)


def run_write(x, weight, cos, sin, qat, nope, dst_dtype, seed):
    slots, rows = destinations(x.shape[0], seed)
    want_pool = poisoned_pool(dst_dtype, x.shape[-1])
    with mode("reference"):
        cr.write_cache_rows(want_pool, slots, rows, x, cos, sin, norm=(weight, EPS), qat=qat,
                            nope=nope)
    got_pool = poisoned_pool(dst_dtype, x.shape[-1])
    with mode("triton"):
        cr.write_cache_rows(got_pool, slots, rows, x, cos, sin, norm=(weight, EPS), qat=qat,
                            nope=nope)
    untouched = torch.ones(SLOTS, ROWS_PER_SLOT, dtype=torch.bool, device=DEVICE)
    untouched[slots, rows] = False
    assert torch.isnan(got_pool[untouched]).all(), "a row outside the destinations was written"
    return got_pool[slots, rows], want_pool[slots, rows]


@pytest.mark.parametrize("qat", [None, "fp8"])
@pytest.mark.parametrize("x_dtype,dst_dtype", [(torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16),
                                               (torch.float32, torch.float32)],
                         ids=["kv-bf16", "entry-fp32-into-bf16", "fp32"])
def test_kv_and_entry_rows(qat, x_dtype, dst_dtype):
    """The window's kv (bf16 in) and the compressor's entry (fp32 in), FP8 prefix or none."""
    x, weight, cos, sin = make(TOKENS, (D_KV,), x_dtype, seed=1 + (qat is None))
    got, want = run_write(x, weight, cos, sin, qat, NOPE_KV, dst_dtype, seed=3)
    if qat == "fp8":
        step = fp8_step(want, NOPE_KV, x_dtype)
    elif dst_dtype == torch.bfloat16:
        step = bf16_step(want)
    else:
        step = fp32_step(want)
    coarse = torch.arange(D_KV, device=DEVICE) < (NOPE_KV if qat == "fp8" else 0)
    if dst_dtype == torch.bfloat16:
        coarse[:] = True
    assert_one_step_moves(got, want, step, f"{qat} {x_dtype} -> {dst_dtype}", coarse)


@pytest.mark.parametrize("dst_dtype", [torch.bfloat16, torch.float32])
def test_index_key_rows(dst_dtype):
    """The indexer compressor's key: fp32 in, norm, RoPE, Hadamard + FP4."""
    x, weight, cos, sin = make(TOKENS, (D_IX,), torch.float32, seed=5)
    got, want = run_write(x, weight, cos, sin, "fp4", 0, dst_dtype, seed=6)
    assert_one_step_moves(got, want, fp4_step(want), f"fp4 key -> {dst_dtype}")


@pytest.mark.parametrize("qat", [None, "fp4"])
def test_index_query_rows(qat):
    """The indexer's queries: bf16 heads in, RoPE without norm, Hadamard + FP4 -> fp32."""
    x, _, cos, sin = make(TOKENS, (QUERY_HEADS, D_IX), torch.bfloat16, seed=7)
    with mode("reference"):
        want = cr.finish_rows(x, cos, sin, qat=qat)
    with mode("triton"):
        got = cr.finish_rows(x, cos, sin, qat=qat)
    assert got.shape == x.shape and got.dtype == torch.float32
    step = fp4_step(want) if qat else bf16_step(want)  # no qat: the bf16 rope output, exact in fp32
    assert_one_step_moves(got, want, step, f"query {qat}")


def test_query_rows_of_a_split_projection_are_read_in_place():
    """The decode step's indexer queries are a view into a wider GEMV output (token stride
    wider than Hx * D): the kernel reads them through their strides, as if contiguous."""
    x, _, cos, sin = make(TOKENS, (QUERY_HEADS * D_IX + 96,), torch.bfloat16, seed=12)
    view = x[:, 96:].view(TOKENS, QUERY_HEADS, D_IX)
    assert not view.is_contiguous()
    with mode("triton"):
        got = cr.finish_rows(view, cos, sin, qat="fp4")
        want = cr.finish_rows(view.contiguous(), cos, sin, qat="fp4")
    assert torch.equal(got, want)


def test_reference_is_the_decode_steps_chain():
    """The oracle composes the ops the decode step ran unfused."""
    from engine.attention import fp4_roundtrip, fp8_roundtrip, hadamard
    from engine.kernels.rmsnorm_rope import rmsnorm_rope_reference

    x, weight, cos, sin = make(TOKENS, (D_KV,), torch.bfloat16, seed=9)
    y = rmsnorm_rope_reference(x, weight, cos, sin, EPS)
    chain = torch.cat([fp8_roundtrip(y[:, :NOPE_KV]), y[:, NOPE_KV:]], -1)
    assert torch.equal(cr.cache_rows_reference(x, cos, sin, (weight, EPS), "fp8", NOPE_KV), chain)
    xi, wi, cos, sin = make(TOKENS, (D_IX,), torch.float32, seed=10)
    yi = rmsnorm_rope_reference(xi, wi, cos, sin, EPS)
    assert torch.equal(cr.cache_rows_reference(xi, cos, sin, (wi, EPS), "fp4", 0),
                       fp4_roundtrip(hadamard(yi)))


def test_bad_arguments_are_named():
    x, _, cos, sin = make(2, (D_IX,), torch.float32, seed=11)
    slots = rows = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    dst = poisoned_pool(torch.float32, D_IX)
    with pytest.raises(ValueError, match="qat must be"):
        cr.write_cache_rows(dst, slots, rows, x, cos, sin, norm=None, qat="int4")
    with pytest.raises(ValueError, match="multiple of 64"):
        cr.write_cache_rows(dst, slots, rows, x, cos, sin, norm=None, qat="fp8", nope=40)
    with pytest.raises(ValueError, match="power-of-two"):
        cr.finish_rows(torch.zeros(2, 1, 96, device=DEVICE), cos[:, :16], sin[:, :16], qat="fp4")
    with pytest.raises(ValueError, match="dst"):
        cr.write_cache_rows(dst[0], slots, rows, x, cos, sin, norm=None)
    with pytest.raises(ValueError, match="slots and rows"):
        cr.write_cache_rows(dst, slots[:1], rows, x, cos, sin, norm=None)
