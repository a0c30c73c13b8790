"""Device functions that kernels of several files call: bf16 rounding and QAT's FP8 / FP4
round trips, each exact in integer arithmetic on fp32 bits.

Why integers: Triton's CPU interpreter truncates fp32 -> bf16 casts where the GPU rounds to
nearest even, and the e4m3 / e2m1 grids have no Triton cast on every card; bit arithmetic
gives the reference's values on both. Kernels import these names and call them like
`tl` functions (`engine.kernels._triton.helper` jits them with the first kernel).

  round_bf16(x)        fp32 -> the nearest bf16 value (ties to even), still fp32
  e4m3_qat(x, amax)    engine.attention.fp8_roundtrip of x given its block's max |x|
  e2m1_qat(x, amax)    engine.attention.fp4_roundtrip of x given its block's max |x|
  hadamard_rows(y, scale, ROWS, D, LOG2_D)
                       y [ROWS, D] times the Sylvester Hadamard matrix times scale: the
                       fast Walsh-Hadamard butterfly (D = 2^LOG2_D), one index bit a stage
  wait_for_inputs(PDL)  in a kernel launched with engine.kernels.pdl_launch, before anything
                       that reads what an earlier kernel wrote or writes what it may read
                       (only weight loads come before it): wait until the kernel before
                       has finished (its writes visible), then let the next one launch;
                       nothing when PDL is False
  rotate_pairs(x, cos, sin, rot, ROWS, D)
                       engine.rope.apply_rope of a [ROWS, D] tile: interleaved pairs
                       (2i, 2i+1) with rot[i] turn by cos / sin [ROWS, D/2]; others stay

The QAT functions take the block's amax (the caller reduces over its own tile shape) and
return e4m3(clamp(x / s, +-448)) * s, resp. the nearest e2m1 value of clamp(x / s, +-6)
times s (an exact midpoint goes to the lower value, the reference's bucketize rule), with
s = 2^ceil(log2(max(amax, 1e-4) / fmt_max)) read off amax's bits (amax <= max * 2^k <=>
k >= e - log2(max) + [mantissa above max's]); dividing by s is an exact multiply by 2^-k
and q * s has at most 4 significant bits. (The reference's log2 can round up to an integer
k for an amax within an ulp above max * 2^k; the exact rule then picks 2^(k+1): measure
zero for real activations.)
"""

from __future__ import annotations

from engine.kernels._triton import helper

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)


@helper
def wait_for_inputs(PDL: tl.constexpr):
    # Everything after this may read what the previous kernel wrote and overwrite what it
    # read. Launching the next kernel only now (not at this kernel's start) keeps one
    # kernel waiting at a time: its programs hold SM slots while they wait
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@helper
def round_bf16(x):
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@helper
def _scale_exponent(amax, emax, mantissa):
    """The least k with fmt_max * 2^k >= max(amax, 1e-4), fmt_max = 1.m * 2^emax (mantissa:
    m's 23-bit field): k = e(amax) - emax, one more when amax's mantissa is above m."""
    bits = tl.maximum(amax, 1e-4).to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 - emax + ((bits & 0x7FFFFF) > mantissa).to(tl.int32)


@helper
def _pow2(k):
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@helper
def e4m3_qat(x, amax):
    k = _scale_exponent(amax, 8, 0x600000)  # 448 = 1.75 * 2^8
    scale, inv = _pow2(k), _pow2(-k)
    y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    a = tl.abs(y).to(tl.int32, bitcast=True)
    e = ((a >> 23) & 0xFF) - 127
    drop = 20 + tl.minimum(tl.maximum(-6 - e, 0), 3)  # 20 normal, 21..23 subnormal
    lsb = ((a | 0x800000) >> drop) & 1  # the kept value's parity (implicit bit included)
    r = (a + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)
    q = r.to(tl.float32, bitcast=True)
    tiny = 0.001953125  # 2^-9, e4m3's smallest subnormal
    q = tl.where(e == -10, tl.where(tl.abs(y) > 0.0009765625, tiny, 0.0), q)  # 2^-10 ties to 0
    q = tl.where(e < -10, 0.0, q)
    q = tl.where(y < 0, -q, q)
    return q * scale


@helper
def e2m1_qat(x, amax):
    k = _scale_exponent(amax, 2, 0x400000)  # 6 = 1.5 * 2^2
    scale, inv = _pow2(k), _pow2(-k)
    y = tl.minimum(tl.maximum(x * inv, -6.0), 6.0)
    v = tl.abs(y)
    q = 0.5 * ((v > 0.25).to(tl.float32) + (v > 0.75).to(tl.float32)
               + (v > 1.25).to(tl.float32) + (v > 1.75).to(tl.float32))
    q += (v > 2.5).to(tl.float32) + (v > 3.5).to(tl.float32) + 2.0 * (v > 5.0).to(tl.float32)
    q = tl.where(y < 0, -q, q)
    return q * scale


@helper
def rotate_pairs(x, cos, sin, rot, ROWS: tl.constexpr, D: tl.constexpr):
    a, b = tl.split(tl.reshape(x, [ROWS, D // 2, 2]))
    ra = tl.where(rot[None, :], a * cos - b * sin, a)
    rb = tl.where(rot[None, :], a * sin + b * cos, b)
    return tl.reshape(tl.join(ra, rb), [ROWS, D])


@helper
def hadamard_rows(y, scale, ROWS: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr):
    # pairs (i, i ^ 2^b) with bit b of i clear -> (lo + hi, lo - hi): H[i, j] = (-1)^|i & j|.
    # Reshapes and size-2 reductions only: a [D, D] matrix for tl.dot would spill (7 KB a
    # thread at D = 128, bench/kernels/compile_check.py)
    for b in tl.static_range(LOG2_D):
        y4 = tl.reshape(y, [ROWS, D // (2 << b), 2, 1 << b])
        pick = tl.arange(0, 2)[None, None, :, None]
        lo = tl.sum(tl.where(pick == 0, y4, 0.0), axis=2)[:, :, None, :]
        hi = tl.sum(tl.where(pick == 1, y4, 0.0), axis=2)[:, :, None, :]
        y = tl.reshape(tl.where(pick == 0, lo + hi, lo - hi), [ROWS, D])
    return y * scale
