"""engine.kernels.fp8_linear against plain PyTorch formulas.

CPU (CI): TRITON_INTERPRET at tiny odd shapes with partial 128-blocks (N = 200: the second
scale row covers 72 rows; K = 320: the last K block is 64 wide). CUDA: the same tests at the
real V4-Flash shapes.

Tolerances are against an fp64 product of the same operands (x as given, or DeepSeek's
quantised x; the exactly dequantised weight), so they only have to cover the kernel's own
rounding: the cast of the result to the output dtype (OUT_ROUNDING) plus fp32 accumulation, whose error grows like sqrt(K) * 2^-24 * sum|x*w|
(<= 2^-17 of it for K <= 8192); 2^-16 leaves a factor of two. e4m3 x bf16 products are exact
in fp32, so nothing else rounds.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from engine import formats as fm
from engine.kernels import fp8_linear as fl
from engine.kernels import mode
from engine.linear import Linear
from tests.engine.kernels.conftest import DEVICE, ON_GPU, assert_close_verbose

# (N, K, G) per projection; G > 1 is the grouped wo_a (N per group).
REAL_SHAPES = {
    "wq_a": (1024, 4096, 1), "wq_b": (32768, 1024, 1), "wkv": (512, 4096, 1),
    "wo_a": (1024, 4096, 8), "wo_b": (4096, 8192, 1), "w13": (2048, 4096, 1),
    "w2": (4096, 2048, 1), "idx_wq_b": (8192, 1024, 1), "mtp_proj": (4096, 4096, 1),
}
TINY_SHAPES = {"odd": (200, 320, 1), "grouped": (72, 256, 3)}
SHAPES = REAL_SHAPES if ON_GPU else TINY_SHAPES
ROWS = (1, 3, 17, 32)
# Relative error of the final cast to the output dtype: half an ulp is <= 2^-8 of a bf16
# value (8 significant bits), 2^-11 for fp16, 2^-24 for f32; the interpreter's fp32 -> bf16
# cast truncates instead of rounding, a whole ulp (<= 2^-7).
OUT_ROUNDING = {torch.bfloat16: 2.0**-8 if ON_GPU else 2.0**-7, torch.float16: 2.0**-11,
                torch.float32: 2.0**-24}
DTYPES = (torch.float32, torch.bfloat16)  # f32: the tiny test model; bf16: the real one


@pytest.fixture(autouse=True)
def _restore_settings():
    # heuristic configs: on a GPU, autotuning every key would compile ~18 variants per test
    # (test_autotune covers the tuner itself)
    fl.set_autotune(False)
    yield
    fl.pin_config(None)
    fl.set_act_quant(False)
    fl.set_autotune(True)


def random_fp8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantised weight whose 128 x 128 blocks have different magnitudes (so a scale
    applied to the wrong block shows), with fresh values per seed."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    rows, cols = fm.fp8_scale_shape(n, k)
    block_mag = torch.exp2(torch.randint(-8, 2, (rows, cols), generator=g).float())
    w = w * block_mag.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    q, s = fm.quantize_fp8(w)
    return q.to(DEVICE), s.to(DEVICE)


def random_x(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def expected(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, groups: int, act_quant: bool,
             fp8_mma: bool = False):
    """fp64 product of the operands the kernel sees, and the tolerance for x.dtype output.

    fp8_mma: the product ran on Hopper's FP8 MMA (`_scaled_mm`), which keeps only ~14 bits
    while accumulating inside a 128 block (DeepSeek-V3 report, section 3.3.2): 2^-10 of
    sum|x*w| covers that with room."""
    out_dtype = x.dtype
    if act_quant:
        x = fl.act_dequant(*fl.act_quant_reference(x), torch.float32)
    w = fm.dequantize_fp8(q, s, torch.float64)
    xd = x.double()
    if groups == 1:
        ref, bound = xd @ w.T, xd.abs() @ w.abs().T
    else:
        wg = w.view(groups, -1, w.shape[1])
        ref = torch.einsum("mgk,gnk->mgn", xd, wg)
        bound = torch.einsum("mgk,gnk->mgn", xd.abs(), wg.abs())
    return ref, OUT_ROUNDING[out_dtype] * ref.abs() + (2.0**-10 if fp8_mma else 2.0**-16) * bound


def run(x, q, s, groups, act_quant):
    if groups == 1:
        return fl.fp8_linear(x, q, s, act_quant=act_quant)
    return fl.fp8_linear_grouped(x, q, s, act_quant=act_quant)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act_quant", (False, True), ids=("bf16act", "actquant"))
@pytest.mark.parametrize("name", SHAPES)
def test_matches_formula(name, act_quant, dtype, triton_mode, poisoned_empty):
    n, k, groups = SHAPES[name]
    q, s = random_fp8(groups * n, k, seed=zlib.crc32(name.encode()) % 1000)
    for i, m in enumerate(ROWS):
        x = random_x((m, groups, k) if groups > 1 else (m, k), dtype, seed=i)
        y = run(x, q, s, groups, act_quant)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
        ref, tol = expected(x, q, s, groups, act_quant)
        assert_close_verbose(y, ref, tol, f"{name} M={m} {dtype} act_quant={act_quant}")


@pytest.mark.parametrize("m", (1, 5))
@pytest.mark.parametrize("uneven_k", (False, True), ids=("k%128=0", "k%128!=0"))
def test_every_candidate_config(m, uneven_k, triton_mode, poisoned_empty):
    """Each generated config (dot and FMA paths, split-K 1..n, the FMA path with and without
    the next block's prefetch) computes the same product, also where K ends mid-block."""
    n, k = (1024, 4096) if ON_GPU else (72, 512)
    k -= 64 if uneven_k else 0
    dtype = DTYPES[-1]
    q, s = random_fp8(n, k, seed=3)
    x = random_x((m, k), dtype, seed=4)
    ref, tol = expected(x, q, s, 1, False)
    configs = fl._candidate_configs(fl.m_bucket(m), n, k, 132)
    # the tiny shape must still reach the split-K reduction and (for m=1) both paths
    assert any(c.split_k > 1 for c in configs)
    assert {c.use_dot for c in configs} == ({True, False} if m == 1 else {True})
    assert any(c.prefetch and c.split_k > 1 for c in configs) == (m == 1)
    for cfg in configs:
        fl.pin_config(cfg)
        assert_close_verbose(fl.fp8_linear(x, q, s), ref, tol, f"M={m} {cfg}")


def test_split_k_uneven_and_deterministic(triton_mode, poisoned_empty):
    """A split that does not divide the K blocks (5 blocks over 3 slices), twice: same bits."""
    n, k = (512, 4096 + 640) if ON_GPU else (40, 640)
    q, s = random_fp8(n, k, seed=5)
    x = random_x((3, k), torch.float32, seed=6)
    fl.pin_config(fl.Fp8LinearConfig(block_n=32, split_k=3, use_dot=True))
    y1, y2 = fl.fp8_linear(x, q, s), fl.fp8_linear(x, q, s)
    ref, tol = expected(x, q, s, 1, False)
    assert_close_verbose(y1, ref, tol, "split 3")
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("use_dot", (True, False), ids=("dot", "fma"))
def test_split_k_leaves_its_counters_at_zero(use_dot, triton_mode, poisoned_empty):
    """The last slice of a tile reduces and resets the tile's arrival counter: after a split
    launch every counter is 0 again, so the next launch (or graph replay) starts clean, and
    a second shape right after the first still gets its own right answer."""
    n, k = (1024, 4096) if ON_GPU else (72, 640)
    q, s = random_fp8(n, k, seed=7)
    m = 1 if not use_dot else 4
    fl.pin_config(fl.Fp8LinearConfig(block_n=16, split_k=4, use_dot=use_dot))
    for seed in (8, 9):
        x = random_x((m, k), torch.float32, seed=seed)
        y = fl.fp8_linear(x, q, s)
        ref, tol = expected(x, q, s, 1, False)
        assert_close_verbose(y, ref, tol, f"split 4 seed {seed}")
        assert int(fl._arrival_counters(x.device).abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", (1, 3, 40), ids=("fma", "dot", "prefill"))
def test_swiglu_prologue_is_w2_of_the_swiglu(m, dtype, triton_mode, poisoned_empty):
    """swiglu=True: the GEMV reads gate | up and multiplies swiglu(gu), rounded to x's dtype
    as the SwiGLU kernel rounds it (so the operand is the same bits), for the FMA and dot
    paths with split-K and for prefill rows (the SwiGLU kernel, then the dense path)."""
    from engine.kernels.swiglu import swiglu_reference

    n, k = (4096, 2048) if ON_GPU else (200, 320)  # the shared expert's w2; odd on the CPU
    q, s = random_fp8(n, k, seed=27)
    gu = random_x((m, 2 * k), dtype, seed=28) * 2
    h = swiglu_reference(gu)
    ref, tol = expected(h, q, s, 1, False)
    if m <= fl.MAX_DECODE_ROWS:
        fl.pin_config(fl.Fp8LinearConfig(block_n=16, split_k=2, use_dot=m > 1))
    y = fl.fp8_linear(gu, q, s, swiglu=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_verbose(y, ref, tol, f"swiglu M={m}")
    fl.pin_config(None)
    with pytest.raises(ValueError, match="swiglu wants"):
        fl.fp8_linear(gu[:, :-2], q, s, swiglu=True)


def test_act_quant_reference_is_deepseeks_formula():
    """act_quant_reference against DeepSeek-V4's formula written out with log2 (on blocks
    away from powers of two, where log2 is exact enough), plus the floor and the edges."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 384, generator=g) * torch.tensor([1e-3, 1.0, 37.0, 1e3])[:, None]
    x[0, :128] = 0.0  # all-zero block: the 1e-4 floor, no division by zero
    q, s = fl.act_quant_reference(x)
    amax = x.view(4, 3, 128).abs().amax(-1).clamp(min=1e-4)
    want_s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    assert torch.equal(s, want_s)
    want_q = (x.view(4, 3, 128) / want_s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want_q.view(4, 384).view(torch.uint8))
    # amax exactly 448 * 2^j: the scale is exactly 2^j (ceil of an integer log2)
    e = torch.zeros(1, 128)
    e[0, 0] = 448.0 * 2.0**-5
    assert fl.act_quant_reference(e)[1].item() == 2.0**-5
    # just above it: one binade up, where float32 log2 would round back down
    e[0, 0] = 448.0 * 2.0**-5 * (1 + 2.0**-23)
    assert fl.act_quant_reference(e)[1].item() == 2.0**-4


def test_act_quant_rounding_in_kernel(triton_mode, poisoned_empty):
    """An identity weight makes y = the kernel's quantised x itself: ties to even, binade
    edges, subnormals and the clamp must match torch's e4m3 cast bit for bit."""
    k = 256
    q = torch.eye(k).to(torch.float8_e4m3fn).to(DEVICE)
    s = torch.full(fm.fp8_scale_shape(k, k), 127, dtype=torch.uint8, device=DEVICE)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(8)) * 50
    x[:, 0] = 448.0  # block amax 448: scale exactly 1, so x / s is x itself
    ties = torch.tensor([1.0625, 17.0, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 30.99, 31.0, -1.1875,
                         240.0 + 8.0, 0.0, -0.0, 2.0**-10, 3 * 2.0**-10])
    x[:, 1:1 + len(ties)] = ties
    x[1, 128:] *= 1e-6  # a block under the 1e-4 amax floor
    x = x.to(DEVICE)
    want = fl.act_dequant(*fl.act_quant_reference(x), torch.float32)
    for m in (1, 3):  # the FMA path (one row) and the dot path
        fl.pin_config(fl.Fp8LinearConfig(64, 1, use_dot=m > 1))
        got = fl.fp8_linear(x[:m], q, s, act_quant=True)
        assert_close_verbose(got, want[:m], 0.0, f"quantised x, M={m}")


def test_prefill_rows_take_the_dense_path(triton_mode, poisoned_empty):
    """M > 32: dequantise + matmul (or _scaled_mm with act_quant on FP8 cards)."""
    n, k, groups = (4096, 4096, 1) if ON_GPU else (136, 256, 1)
    q, s = random_fp8(n, k, seed=9)
    x = random_x((2, 40, k), torch.bfloat16, seed=10)
    for act_quant in (False, True):
        y = fl.fp8_linear(x, q, s, act_quant=act_quant)
        ref, tol = expected(x, q, s, groups, act_quant, fp8_mma=act_quant and ON_GPU)
        assert_close_verbose(y, ref, tol, f"prefill act_quant={act_quant}")
    xg = random_x((40, 3, k), torch.bfloat16, seed=11)
    qg, sg = random_fp8(3 * 72, k, seed=12)
    ref, tol = expected(xg, qg, sg, 3, False)
    assert_close_verbose(fl.fp8_linear_grouped(xg, qg, sg), ref, tol, "prefill grouped")


def test_linear_dispatch(monkeypatch):
    """Linear.forward takes the kernel for FP8 weights under the switch, the unchanged
    F.linear on the reference path, and the act_quant setting."""
    k, n = 256, 136
    lin = Linear(k, n)
    q, s = random_fp8(n, k, seed=13)
    lin.load_fp8(q.cpu(), s.cpu())
    lin.to(DEVICE)
    x = random_x((2, 1, k), torch.bfloat16, seed=14)

    with mode("reference"):
        assert torch.equal(lin(x), F.linear(x, fm.dequantize_fp8(lin.weight, lin.scale, x.dtype)))

    fl.pin_config(fl.Fp8LinearConfig(64, 1, True))  # no autotune launches on a GPU
    launches = []
    real_launch = fl._launch
    monkeypatch.setattr(fl, "_launch", lambda *a, **kw: launches.append(a[5]) or real_launch(*a, **kw))
    with mode("triton"):
        y = lin(x)
        fl.set_act_quant(True)
        yq = lin(x)
    assert launches == [False, True]  # one kernel launch each, with the act_quant flag
    ref, tol = expected(x, lin.weight, lin.scale, 1, False)
    assert_close_verbose(y, ref, tol, "Linear bf16 activations")
    ref, tol = expected(x, lin.weight, lin.scale, 1, True)
    assert_close_verbose(yq, ref, tol, "Linear act_quant")

    with mode("reference"):  # the reference path follows the setting too
        assert_close_verbose(lin(x), ref, tol, "Linear act_quant reference")


def test_bad_arguments_are_named():
    q, s = random_fp8(128, 256, seed=15)
    x = random_x((1, 256), torch.bfloat16, seed=16)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fl.fp8_linear(x, q.view(torch.uint8), s)
    with pytest.raises(ValueError, match="does not fit"):
        fl.fp8_linear(x[:, :128], q, s)
    with pytest.raises(ValueError, match="scale"):
        fl.fp8_linear(x, q, s[:, :1])
    with pytest.raises(ValueError, match="multiple of G"):
        fl.fp8_linear_grouped(x.view(1, 1, 256).expand(1, 3, 256), q, s)


def test_autotune(triton_mode):
    """CUDA: tuning a key keeps one of its candidates, and the tuned call is still right.
    CPU: timing the interpreter means nothing, so no key is tuned."""
    fl.set_autotune(True)
    n, k = (2048, 4096) if ON_GPU else (72, 256)
    q, s = random_fp8(n, k, seed=17)
    x = random_x((1, k), DTYPES[-1], seed=18)
    y = fl.fp8_linear(x, q, s)
    key = (1, 1, n, k, x.dtype, False, str(x.device), None)
    if ON_GPU:
        assert fl._tuned[key] in fl._candidate_configs(1, n, k, fl._num_sms(x.device))
    else:
        assert key not in fl._tuned
    ref, tol = expected(x, q, s, 1, False)
    assert_close_verbose(y, ref, tol, "autotuned")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture(triton_mode):
    """The decode launch (split-K: one kernel, a workspace, counters) captures and replays: no host
    sync, no allocation that depends on data; replays follow new inputs in the static buffer."""
    n, k = 512, 4096  # wkv: split-K under the heuristic
    q, s = random_fp8(n, k, seed=19)
    x = random_x((4, k), torch.bfloat16, seed=20)
    assert fl._candidate_configs(16, n, k, fl._num_sms(x.device))[0].split_k > 1
    fl.fp8_linear(x, q, s)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fl.fp8_linear(x, q, s)
    for seed in (21, 22):
        x.copy_(random_x((4, k), torch.bfloat16, seed=seed))
        y.fill_(float("nan"))
        graph.replay()
        ref, tol = expected(x, q, s, 1, False)
        assert_close_verbose(y, ref, tol, f"graph replay {seed}")


@pytest.mark.skipif(not ON_GPU, reason="two CUDA streams need a GPU")
@pytest.mark.parametrize("use_dot", (True, False), ids=("dot", "fma"))
def test_split_k_repeats_bit_for_bit_with_the_side_stream_busy(use_dot, triton_mode):
    """The in-kernel reduction sums the slices in slice order whichever arrives last, so one
    launch gives the same bits every time, also while split-K launches run on engine.overlap's
    side stream (its own counters). 200 repeats of wo_b's shape."""
    from engine import overlap

    n, k = 4096, 8192
    q, s = random_fp8(n, k, seed=23)
    q2, s2 = random_fp8(1024, 4096, seed=24)
    m = 4 if use_dot else 1
    x = random_x((m, k), torch.bfloat16, seed=25)
    x2 = random_x((m, 4096), torch.bfloat16, seed=26)
    fl.pin_config(fl.Fp8LinearConfig(block_n=32, split_k=8, use_dot=use_dot))
    first = fl.fp8_linear(x, q, s)
    outs = []
    for _ in range(200):
        side = overlap.fork(x)
        assert side is not None
        with overlap.on(side):
            for _ in range(3):
                fl.fp8_linear(x2, q2, s2)
        outs.append(fl.fp8_linear(x, q, s))
        overlap.join(side)
    torch.cuda.synchronize()
    differing = sum(not torch.equal(y, first) for y in outs)
    assert differing == 0, f"{differing} of 200 repeats differ from the first launch"
    ref, tol = expected(x, q, s, 1, False)
    assert_close_verbose(first, ref, tol, "split 8")
    for stream in (torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            assert int(fl._arrival_counters(x.device).abs().sum()) == 0
