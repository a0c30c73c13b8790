"""Routed-expert kernels (engine/kernels/routed_experts.py) against plain PyTorch, and the
MoE block's fast path against its reference loop.

On the CPU the kernels run in Triton's interpreter at tiny shapes (tests/engine/kernels/
conftest.py sets TRITON_INTERPRET=1); with CUDA the same tests run at V4-Flash's real shapes
(H 4096, I 2048, E 256, K 6).

Tolerances. Two paths that compute the same fp32 dot products in different orders differ
by a few fp32 ulps of the sums (FP32_TOL). With bf16 activations both paths round g, u, h
and each expert's output to bf16 at the same points, but a last-bit difference in an fp32
sum can flip one of those roundings by one bf16 ulp (2^-8 relative), and a flipped h_i then
moves every output by |W2[:, i]| ulp(h_i): a few flips among the 2I + I roundings add up to
several ulps of the largest output (measured: up to 4.1 for the kernels alone over 18 draws,
5.5 for the MoE block, whose bf16 reference also rounds each dequantised weight to bf16).
BF16_TOL allows eight; a wrong scale, zero, clamp or expert is off by far more.
"""

from __future__ import annotations

import pytest
import torch

from engine import formats as fm
from engine.config import ModelConfig
from engine.formats import WeightFormat
from engine.kernels import mode
from engine.kernels.routed_experts import (
    ExpertStack,
    dequantize_rows,
    routed_experts,
    routed_experts_reference,
)
from engine.moe import MoE
from engine.random_weights import random_fp4, random_int2

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (E, K, H, I): tiny for the interpreter (INT2 needs H and I multiples of 128, FP4 of 32;
# DENSE takes any size, so its shape also leaves partial row and word blocks), real on CUDA
SHAPES = {
    WeightFormat.INT2: (256, 6, 4096, 2048) if CUDA else (8, 3, 128, 128),
    WeightFormat.FP4: (256, 6, 4096, 2048) if CUDA else (8, 3, 96, 160),
    WeightFormat.DENSE: (16, 6, 4096, 2048) if CUDA else (8, 3, 100, 72),  # E 16: 2 GB dense
}
# MoE-block tests build a whole block per case: fewer experts on CUDA (the kernels' own
# tests cover E = 256), which keeps each build to seconds
MOE_EXPERTS = 32 if CUDA else None
FORMATS = tuple(SHAPES)
LIMIT = 10.0
FP32_TOL = 1e-5            # relative to the largest |output|: a few fp32 ulps of long sums
BF16_TOL = 8 * 2.0 ** -8   # relative to the largest |output|: eight bf16 ulps


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """|actual - expected| <= rel * max|expected| everywhere; names the worst indices if not."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite output at " \
        f"{torch.nonzero(~torch.isfinite(actual))[:8].tolist()}"
    atol = rel * expected.abs().max().item()
    err = (actual.float() - expected.float()).abs()
    bad = torch.nonzero(err > atol)
    if len(bad):
        worst = [(tuple(i), actual[tuple(i)].item(), expected[tuple(i)].item())
                 for i in bad[err[tuple(bad.T)].argsort(descending=True)][:8].tolist()]
        raise AssertionError(f"{what}: {len(bad)} of {err.numel()} beyond {atol:.3g} "
                             f"(max err {err.max().item():.3g}); worst (index, got, want): {worst}")


def make_stack(fmt: WeightFormat, seed: int, num_experts: int | None = None) -> ExpertStack:
    """Random stacked experts in `fmt`: quantised N(0, 1/fan_in) values (random packed codes
    at the real shape on CUDA, where quantising 256 experts would take minutes)."""
    E, _, H, inter = SHAPES[fmt]
    E = num_experts or E
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if fmt == WeightFormat.INT2:
        if CUDA:
            return ExpertStack(fmt, H, inter, *random_int2(E, 2 * inter, H, H ** -0.5, g, DEVICE),
                               *random_int2(E, H, inter, inter ** -0.5, g, DEVICE))
        w13 = torch.randn(E, 2 * inter, H, generator=g) * H ** -0.5
        w2 = torch.randn(E, H, inter, generator=g) * inter ** -0.5
        return ExpertStack(fmt, H, inter, *fm.quantize_int2(w13), *fm.quantize_int2(w2))
    if fmt == WeightFormat.FP4:
        w13, s13 = random_fp4(E, 2 * inter, H, H ** -0.5, g, DEVICE)
        w2, s2 = random_fp4(E, H, inter, inter ** -0.5, g, DEVICE)
        return ExpertStack(fmt, H, inter, w13, s13, None, w2, s2, None)
    w13 = torch.randn(E, 2 * inter, H, generator=g, device=DEVICE) * H ** -0.5
    w2 = torch.randn(E, H, inter, generator=g, device=DEVICE) * inter ** -0.5
    return ExpertStack(fmt, H, inter, w13.bfloat16(), None, None, w2.bfloat16(), None, None)


def routing(N: int, E: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives) and positive weights."""
    experts = torch.rand(N, E, generator=g, device=DEVICE).argsort(dim=-1)[:, :K]
    weights = torch.rand(N, K, generator=g, device=DEVICE) + 0.25
    return experts, weights


def run_kernel(x, experts, weights, stack, limit=LIMIT) -> torch.Tensor:
    out = torch.full((x.shape[0], stack.hidden), float("nan"), device=x.device)  # poisoned
    with mode("triton"):
        y = routed_experts(x, experts, weights, stack, limit, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert not y.isnan().any(), "output not fully written"
    return y


STACKS: dict[WeightFormat, ExpertStack] = {}


def stack_for(fmt: WeightFormat) -> ExpertStack:
    if fmt not in STACKS:  # one per format per session: building them is the slow part
        STACKS[fmt] = make_stack(fmt, seed=list(FORMATS).index(fmt))
    return STACKS[fmt]


# -- the kernels against their PyTorch reference -----------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("N", "dtype"), [(1, torch.float32), (3, torch.bfloat16),
                                          (5, torch.float32)])
def test_kernels_match_reference(fmt, N, dtype):
    stack = stack_for(fmt)
    E, K, H, _ = SHAPES[fmt]
    g = torch.Generator(device=DEVICE).manual_seed(100 + N)
    x = (torch.randn(N, H, generator=g, device=DEVICE) * 2).to(dtype)
    experts, weights = routing(N, E, K, g)
    want = routed_experts_reference(x, experts, weights, stack, LIMIT)
    rel = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_close(run_kernel(x, experts, weights, stack), want, rel, f"{fmt} N={N} {dtype}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_tokens_on_one_expert_and_unused_experts_never_read(fmt):
    """Every token routes slot 0 to expert 1; the experts nobody uses get NaN weights,
    which would poison the output if any program read them."""
    E, K, H, _ = SHAPES[fmt]
    clean = stack_for(fmt)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    N = 4
    experts = torch.stack([torch.cat([torch.tensor([1], device=DEVICE),
                                      2 + torch.randperm(E - 2, generator=g, device=DEVICE)[: K - 1]])
                           for _ in range(N)])
    used = torch.zeros(E, dtype=torch.bool, device=DEVICE)
    used[experts.flatten()] = True
    assert not used.all()
    poisoned = ExpertStack(**{f: getattr(clean, f) for f in
                              ("format", "hidden", "inter", "w13", "scale13", "zero13",
                               "w2", "scale2", "zero2")})
    if fmt == WeightFormat.DENSE:
        nan = float("nan")
        poisoned.w13 = clean.w13.clone()
        poisoned.w13[~used] = nan
        poisoned.w2 = clean.w2.clone()
        poisoned.w2[~used] = nan
    elif fmt == WeightFormat.INT2:  # fp16 NaN scales
        poisoned.scale13 = clean.scale13.clone()
        poisoned.scale13[~used] = float("nan")
        poisoned.scale2 = clean.scale2.clone()
        poisoned.scale2[~used] = float("nan")
    else:  # E8M0 byte 255 decodes to inf, and inf * 0 codes = NaN
        poisoned.scale13 = copy(clean.scale13)
        poisoned.scale13.view(torch.uint8)[~used] = 255
        poisoned.scale2 = copy(clean.scale2)
        poisoned.scale2.view(torch.uint8)[~used] = 255
    x = torch.randn(N, H, generator=g, device=DEVICE)
    weights = torch.rand(N, K, generator=g, device=DEVICE) + 0.25
    want = routed_experts_reference(x, experts, weights, clean, LIMIT)
    assert_close(run_kernel(x, experts, weights, poisoned), want, FP32_TOL, f"{fmt} one expert")


@pytest.mark.parametrize("fmt", [WeightFormat.INT2, WeightFormat.DENSE])
def test_out_of_range_expert_ids_contribute_nothing(fmt):
    """Padded rows of a captured batch may carry id -1 (or E): their terms are 0."""
    E, K, H, _ = SHAPES[fmt]
    stack = stack_for(fmt)
    g = torch.Generator(device=DEVICE).manual_seed(11)
    N = 3
    x = torch.randn(N, H, generator=g, device=DEVICE)
    experts, weights = routing(N, E, K, g)
    padded = experts.clone()
    padded[0, 1], padded[2, 0] = -1, E
    kept = weights.clone()
    kept[0, 1], kept[2, 0] = 0.0, 0.0  # weight 0 removes a term exactly (h = 0 * ...)
    want = routed_experts_reference(x, experts, kept, stack, LIMIT)
    assert_close(run_kernel(x, padded, weights, stack), want, FP32_TOL, f"{fmt} padded ids")
    row1 = routed_experts_reference(x[1:2], experts[1:2], weights[1:2], stack, LIMIT)
    assert_close(run_kernel(x, padded, weights, stack)[1:2], row1, FP32_TOL, "untouched row")


@pytest.mark.parametrize("fmt", FORMATS)
def test_swiglu_clamp_is_exercised(fmt):
    """Large activations push g and u past the limit: the kernel must clamp exactly as the
    reference (u to [-10, 10], g to <= 10) and differ from the unclamped result."""
    E, K, H, inter = SHAPES[fmt]
    stack = stack_for(fmt)
    g = torch.Generator(device=DEVICE).manual_seed(13)
    N = 2
    x = torch.randn(N, H, generator=g, device=DEVICE) * 40
    experts, weights = routing(N, E, K, g)
    gu = torch.einsum("pc,prc->pr", x.repeat_interleave(K, dim=0),
                      dequantize_rows(stack, "w13", experts.reshape(-1)))
    assert (gu[:, :inter] > LIMIT).float().mean() > 0.1, "g rarely exceeds the limit"
    assert (gu[:, inter:].abs() > LIMIT).float().mean() > 0.1, "u rarely exceeds the limit"
    want = routed_experts_reference(x, experts, weights, stack, LIMIT)
    got = run_kernel(x, experts, weights, stack)
    assert_close(got, want, FP32_TOL, f"{fmt} clamped")
    unclamped = routed_experts_reference(x, experts, weights, stack, None)
    assert (unclamped - got).abs().max() > 0.1 * unclamped.abs().max()
    assert_close(run_kernel(x, experts, weights, stack, limit=None), unclamped, FP32_TOL,
                 f"{fmt} no limit")


def test_launcher_rejects_mismatched_inputs():
    stack = stack_for(WeightFormat.DENSE)
    E, K, H, _ = SHAPES[WeightFormat.DENSE]
    x = torch.randn(2, H, device=DEVICE)
    experts, weights = routing(2, E, K, torch.Generator(device=DEVICE).manual_seed(0))
    with pytest.raises(ValueError, match="features"):
        routed_experts(x[:, :-1], experts, weights, stack, LIMIT)
    with pytest.raises(ValueError, match=r"\[N=2, K\]"):
        routed_experts(x, experts[:, :-1], weights, stack, LIMIT)
    with pytest.raises(TypeError, match="int32/int64"):
        routed_experts(x, experts.float(), weights, stack, LIMIT)
    with pytest.raises(ValueError, match="out must be"):
        routed_experts(x, experts, weights, stack, LIMIT, out=torch.empty(2, H + 1, device=DEVICE))


# -- the MoE block: stacking, fast path == reference, no host sync ------------------------------


def moe_config(fmt: WeightFormat) -> ModelConfig:
    E, K, H, inter = SHAPES[fmt]
    E = MOE_EXPERTS or E
    return ModelConfig.tiny().replace(hidden_size=H, moe_intermediate_size=inter,
                                      n_routed_experts=E, num_experts_per_tok=K,
                                      num_hash_layers=1, qat=False)


def copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with its own storage; uint32 / E8M0 bytes copied through a same-size view."""
    raw = {torch.uint32: torch.int32, torch.float8_e8m0fnu: torch.uint8}.get(t.dtype)
    return t.clone() if raw is None else t.view(raw).clone().view(t.dtype)


def load_random_moe(fmt: WeightFormat, layer_id: int, dtype: torch.dtype, seed: int) -> MoE:
    """A MoE block whose routed experts are loaded one Linear at a time, in `fmt`, as the
    checkpoint loaders do; learned routing biases spread over a clear margin."""
    c = moe_config(fmt)
    with torch.device("meta"):  # the routed experts' dense placeholders are never allocated
        moe = MoE(layer_id, c, dtype)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    for name, p in list(moe.named_parameters()):
        if name.startswith("experts."):
            continue
        value = torch.randn(p.shape, generator=g, device=DEVICE)
        if not name.endswith("bias"):
            value = value * p.shape[-1] ** -0.5
        module_path, _, leaf = name.rpartition(".")
        moe.get_submodule(module_path)._parameters[leaf] = torch.nn.Parameter(
            value.to(p.dtype), requires_grad=False)
    if moe.gate.hash:
        ranks = torch.rand(c.vocab_size, c.n_routed_experts, generator=g, device=DEVICE)
        moe.gate.tid2eid = ranks.argsort(dim=-1)[:, : c.num_experts_per_tok].contiguous()
    stack = make_stack(fmt, seed, c.n_routed_experts)
    inter = c.moe_intermediate_size
    for e, expert in enumerate(moe.experts):
        for lin, rows, which in ((expert.w1, slice(0, inter), "13"), (expert.w3, slice(inter, 2 * inter), "13"),
                                 (expert.w2, slice(None), "2")):
            w = copy(getattr(stack, "w" + which)[e, rows])
            s = getattr(stack, "scale" + which)
            z = getattr(stack, "zero" + which)
            if fmt == WeightFormat.INT2:
                lin.load_int2(w, copy(s[e, rows]), copy(z[e, rows]))
            elif fmt == WeightFormat.FP4:
                lin.load_fp4(w, copy(s[e, rows]))
            else:
                lin.load_dense(w.to(dtype))
    return moe


@pytest.mark.parametrize("fmt", FORMATS)
def test_stack_experts_makes_views_and_keeps_the_state(fmt):
    moe = load_random_moe(fmt, layer_id=3, dtype=torch.float32, seed=21)
    before = {k: copy(v) for k, v in moe.state_dict().items()}
    h = torch.randn(2, moe_config(fmt).moe_intermediate_size, device=DEVICE)
    y_before = moe.experts[5].w2(h)
    assert moe.stack_experts()
    stack = moe.routed_stack
    after = moe.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8),
                                                          v.view(torch.uint8)), k
    inter = stack.inter
    storages = {"w13": stack.w13, "w2": stack.w2, "scale13": stack.scale13,
                "scale2": stack.scale2, "zero13": stack.zero13, "zero2": stack.zero2}
    for e, expert in enumerate(moe.experts):
        for lin, which, offset in ((expert.w1, "13", 0), (expert.w3, "13", inter), (expert.w2, "2", 0)):
            for field, prefix in (("weight", "w"), ("scale", "scale"), ("zero", "zero")):
                t, base = getattr(lin, field), storages[prefix + which]
                if base is None:
                    assert t is None
                    continue
                # a view into the stack: same storage, at expert e's rows
                assert t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                assert t.data_ptr() == base[e, offset].data_ptr(), (e, field, which)
    # the Linears still compute what they did
    assert torch.equal(moe.experts[5].w2(h), y_before)
    # stacking again keeps this stack: a graph captured on it must stay valid (each
    # DecodeRunner stacks on creation; a second copy freed the first under earlier graphs)
    assert moe.stack_experts() and moe.routed_stack is stack
    assert moe.experts[5].w2.weight.data_ptr() == stack.w2[5].data_ptr()
    # a reload (the Linears no longer views of the stack) stacks afresh
    moe.experts[-1].w2.weight = torch.nn.Parameter(moe.experts[-1].w2.weight.clone(),
                                                   requires_grad=False)
    assert moe.stack_experts() and moe.routed_stack is not stack


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("layer_id", "dtype", "N"), [(0, torch.float32, 3),
                                                      (3, torch.float32, 1),
                                                      (3, torch.bfloat16, 5)])
def test_moe_fast_path_equals_reference(fmt, layer_id, dtype, N):
    """layer 0 routes by the hash table, layer 3 by the learned gate."""
    moe = load_random_moe(fmt, layer_id, dtype, seed=31 + layer_id)
    assert moe.gate.hash == (layer_id == 0)
    g = torch.Generator(device=DEVICE).manual_seed(41 + N)
    x = (torch.randn(1, N, moe_config(fmt).hidden_size, generator=g, device=DEVICE) * 2).to(dtype)
    ids = torch.randint(0, 129280, (1, N), generator=g, device=DEVICE)
    with mode("reference"):
        want = moe(x, ids)
    assert moe.routed_stack is None  # the reference path needs no stack
    with mode("triton"):
        got = moe(x, ids)
    assert moe.routed_stack is not None
    rel = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert got.dtype == want.dtype == dtype
    assert_close(got.float(), want.float(), rel, f"MoE {fmt} layer {layer_id} {dtype} N={N}")


def test_moe_fast_path_has_no_host_sync(monkeypatch):
    """On CUDA: the fast forward runs under sync-debug 'error' and inside a CUDA graph
    capture, and the replayed graph gives the eager result. On the CPU there is no device
    to sync with, so instead every host read of a device value engine code could make
    (.item, .tolist, bool(), torch.unique, nonzero) raises while the fast forward runs;
    the same forward through the reference path trips it, proving the patch works."""
    fmt = WeightFormat.INT2
    moe = load_random_moe(fmt, layer_id=3, dtype=torch.bfloat16, seed=51)
    assert moe.stack_experts()  # before any capture
    g = torch.Generator(device=DEVICE).manual_seed(52)
    x = torch.randn(1, 2, moe_config(fmt).hidden_size, generator=g, device=DEVICE).bfloat16()
    ids = torch.randint(0, 129280, (1, 2), generator=g, device=DEVICE)
    with mode("triton"):
        eager = moe(x, ids)  # warm-up: autotuning and compilation happen here
    if CUDA:
        with mode("triton"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                moe(x, ids)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                moe(x, ids)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = moe(x, ids)
            graph.replay()
            torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        return

    class HostSync(Exception):
        pass

    def refuse(*args, **kwargs):
        raise HostSync

    for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "tolist"),
                        (torch.Tensor, "__bool__"), (torch.Tensor, "nonzero"),
                        (torch.Tensor, "unique"), (torch, "unique"), (torch, "nonzero")):
        monkeypatch.setattr(owner, name, refuse)
    with mode("triton"):
        fast = moe(x, ids)
    with mode("reference"), pytest.raises(HostSync):
        moe(x, ids)
    monkeypatch.undo()
    assert torch.equal(fast, eager)


def test_tiny_model_logits_with_fast_moe_equal_reference():
    """The whole tiny model (dense fp32 experts, hash and learned layers, prefill then one
    decode step) with every MoE block on the kernels gives the reference logits. Deterministic
    inputs: a routing near-tie would show up as a large difference, on every run alike."""
    from tests.engine.conftest import random_tokens, tiny_model

    model = tiny_model(seed=3).to(DEVICE)
    tokens = random_tokens(1, 5, seed=4).to(DEVICE)
    logits = {}
    for path in ("reference", "triton"):
        state = model.new_state(1, 64)
        with mode(path):
            prefill = model(tokens[:, :4], state)
            step = model(tokens[:, 4:], state)
        logits[path] = torch.cat([prefill, step], dim=1)
    stacked = [m for m in model.modules() if isinstance(m, MoE) and m.routed_stack is not None]
    assert len(stacked) == model.config.num_hidden_layers  # the main layers' blocks ran fast
    # fp32 everywhere: only summation orders differ (measured 1.1e-6 of the largest logit
    # after 6 layers); 1e-5 leaves room and still catches any one wrong expert term
    assert_close(logits["triton"], logits["reference"], 1e-5, "tiny model logits")
    assert torch.equal(logits["triton"].argmax(-1), logits["reference"].argmax(-1))


def test_pinned_config_switch(monkeypatch):
    from engine.kernels.routed_experts import CONFIG_ENV, FMT_INT2, candidate_configs

    monkeypatch.setenv(CONFIG_ENV["down"], "BLOCK_N=16,BLOCK_W=32,num_warps=4,num_stages=2")
    assert candidate_configs("down", FMT_INT2) == [
        {"BLOCK_N": 16, "BLOCK_W": 32, "num_warps": 4, "num_stages": 2}]
    monkeypatch.setenv(CONFIG_ENV["down"], "BLOCK_N=16,BLOCK_W=32")
    with pytest.raises(ValueError, match="num_warps"):
        candidate_configs("down", FMT_INT2)
    monkeypatch.setenv(CONFIG_ENV["gate_up"], "BLOCK_N=8,BLOCK_W=32,num_warps=4,num_stages=2")
    with pytest.raises(ValueError, match="whole words"):
        candidate_configs("gate_up", FMT_INT2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prefetch", [0, 1])
def test_narrow_word_blocks_with_and_without_prefetch(fmt, prefetch, monkeypatch):
    """Pinned tiles narrower than a row, so every program walks several word blocks (the
    interpreter's default tile covers a tiny row at once): the prefetching loop, which
    decodes block i while block i + 1 loads, gives what the plain loop gives, up to the
    summation order, and both match the reference. On CUDA the real rows take many blocks
    either way."""
    from engine.kernels import routed_experts as re

    words = 4 if fmt != WeightFormat.DENSE else 32  # INT2 at 128 columns: 8 words, 2 blocks
    for kernel in ("gate_up", "down"):
        monkeypatch.setenv(re.CONFIG_ENV[kernel], f"BLOCK_N=16,BLOCK_W={words},num_warps=4,"
                                                  f"num_stages=2,PREFETCH={prefetch}")
    re._tuned.cache_clear()
    try:
        stack = stack_for(fmt)
        E, K, H, _ = SHAPES[fmt]
        g = torch.Generator(device=DEVICE).manual_seed(7)
        x = torch.randn(3, H, generator=g, device=DEVICE) * 2
        experts, weights = routing(3, E, K, g)
        want = routed_experts_reference(x, experts, weights, stack, LIMIT)
        assert_close(run_kernel(x, experts, weights, stack), want, FP32_TOL,
                     f"{fmt} prefetch={prefetch}")
    finally:
        monkeypatch.undo()
        re._tuned.cache_clear()


@pytest.mark.parametrize("fmt", [WeightFormat.INT2, WeightFormat.FP4])
def test_add_and_activation_dtype_out(fmt):
    """The MoE block's one-pass form: the shared output added to the fp32 sum, the result
    rounded once into a bf16 `out` (as the reference's `(y + shared).to(bf16)`)."""
    E, K, H, _ = SHAPES[fmt]
    stack = stack_for(fmt)
    g = torch.Generator(device=DEVICE).manual_seed(17)
    N = 3
    x = torch.randn(N, H, generator=g, device=DEVICE).bfloat16()
    experts, weights = routing(N, E, K, g)
    add = (torch.randn(N, H, generator=g, device=DEVICE) * 3).bfloat16()
    want = (routed_experts_reference(x, experts, weights, stack, LIMIT) + add.float()).bfloat16()
    out = torch.full((N, H), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    with mode("triton"):
        got = routed_experts(x, experts, weights, stack, LIMIT, out=out, add=add)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.bfloat16
    assert not got.isnan().any()
    assert_close(got.float(), want.float(), BF16_TOL, f"{fmt} add + bf16 out")


def test_fp8_experts_keep_the_reference_path():
    """FP8 experts (configs with expert_dtype fp8) have no routed kernel: stack_experts
    declines and the fast mode runs the reference loop. Its Linears take the FP8 GEMV kernel
    there (fp32 sums in another order), hence FP32_TOL rather than equality."""
    fmt = WeightFormat.DENSE
    moe = load_random_moe(fmt, layer_id=3, dtype=torch.float32, seed=61)
    for expert in moe.experts:
        for lin in (expert.w1, expert.w2, expert.w3):
            lin.load_fp8(*fm.quantize_fp8(lin.weight.float()))
    x = torch.randn(1, 2, moe_config(fmt).hidden_size, device=DEVICE)
    ids = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    with mode("reference"):
        want = moe(x, ids)
    with mode("triton"):
        got = moe(x, ids)
    assert moe.routed_stack is None and not moe.stack_experts()
    assert_close(got, want, FP32_TOL, "fp8 experts, reference loop")
