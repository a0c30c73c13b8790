"""hc_pre / hc_post / hc_head / hc_post_pre (Triton) vs engine/model.py's hc functions, and
Block.forward and the model with the kernels vs the reference path.

On the CPU the kernels run under TRITON_INTERPRET=1 at small shapes (H 96: not a power of
two, so every mask is exercised; N up to 70: five 16-token blocks, the last partial); with
CUDA the same tests run at V4-Flash's (S 4, H 4096, N 1..32). Every buffer the launchers
allocate is NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.kernels import hc, mode
from engine.model import hc_collapse, hc_expand, hc_head, hc_mix
from tests.engine.conftest import random_tokens, tiny_model
from tests.engine.kernels._allclose import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HIDDEN = 4096 if CUDA else 96
TOKENS = [1, 7, 32] if CUDA else [1, 3, 70]
CONFIG = ModelConfig.tiny().replace(hidden_size=HIDDEN)  # hc_mult 4, 20 Sinkhorn iterations
S = CONFIG.hc_mult
M = CONFIG.hc_mix_dim
# the real eps values (1e-6) and 20 converged Sinkhorn iterations hide a dropped eps or
# iteration below any tolerance; this variant makes each of them visible
LOUD = CONFIG.replace(hc_eps=1e-2, rms_norm_eps=0.5, hc_sinkhorn_iters=3)

# fp32 math throughout: the kernels only reorder sums (K = S*H terms for the logits, S for the
# collapse), ~1e-6 relative; post/comb are fp32 outputs of O(1) values.
F32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16 outputs (x, h_new): the fp32 values agree to ~1e-6, so the bf16 rounding can differ by
# at most one ulp where a value sits near a rounding boundary; bf16 keeps 8 significant bits,
# so one ulp is at most 2^-7 of the value.
BF16_TOL = dict(atol=1e-5, rtol=2**-7)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        hc,
        "_empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def make_mix(rows: int, seed: int):
    """fn, scale, base as Transformer.init_random_ draws them (fn ~ N(0, 1/K))."""
    g = torch.Generator().manual_seed(seed)
    K = S * HIDDEN
    fn = torch.randn(rows, K, generator=g) * K**-0.5
    scale = torch.randn(3 if rows == M else 1, generator=g) * 0.2 + 1.0
    base = torch.randn(rows, generator=g) * 0.5
    return fn.to(DEVICE), scale.to(DEVICE), base.to(DEVICE)


def streams(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, S, HIDDEN, generator=g).to(DEVICE, dtype)


def tol(dtype: torch.dtype) -> dict:
    return BF16_TOL if dtype == torch.bfloat16 else F32_TOL


def token_dtype_cases() -> list[tuple[int, torch.dtype]]:
    """Every token count in bf16, all but the largest in fp32 too (the interpreter's time
    goes with the 70-token case; on CUDA every pair runs)."""
    return [
        (n, dtype)
        for n in TOKENS
        for dtype in (torch.bfloat16, torch.float32)
        if CUDA or n != TOKENS[-1] or dtype == torch.bfloat16
    ]


@pytest.mark.parametrize(
    ("n", "dtype", "config"),
    [(n, dtype, CONFIG) for n, dtype in token_dtype_cases()] + [(TOKENS[1], torch.float32, LOUD)],
)
def test_hc_pre_matches_model(n: int, dtype: torch.dtype, config: ModelConfig) -> None:
    h = streams(n, dtype, seed=n)
    fn, scale, base = make_mix(M, seed=n + 1)
    pre, post_want, comb_want = hc_mix(h.unsqueeze(0), fn, scale, base, config)
    x_want = hc_collapse(h.unsqueeze(0), pre)[0]
    with mode("triton"):
        x, post, comb = hc.hc_pre(h, fn, scale, base, config)
    assert x.dtype == dtype and post.dtype == comb.dtype == torch.float32
    assert_close(post, post_want[0], name="post", **F32_TOL)
    assert_close(comb, comb_want[0], name="comb", **F32_TOL)
    assert_close(x, x_want, name="x", **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", TOKENS)
def test_hc_post_matches_model(n: int, dtype: torch.dtype) -> None:
    res = streams(n, dtype, seed=10 + n)
    y = streams(n, dtype, seed=20 + n)[:, 0].contiguous()
    g = torch.Generator().manual_seed(n)
    post = (2 * torch.rand(n, S, generator=g)).to(DEVICE)
    comb = torch.rand(n, S, S, generator=g).to(DEVICE)
    want = hc_expand(y[None], res[None], post[None], comb[None])[0]
    with mode("triton"):
        got = hc.hc_post(y, res, post, comb)
    assert got.dtype == dtype
    assert_close(got, want, name="h_new", **tol(dtype))


@pytest.mark.parametrize(
    ("n", "dtype", "hidden"),
    [(n, dtype, HIDDEN) for n, dtype in token_dtype_cases()]
    # H 24 has no 16-wide K block inside one stream: the unfused fallback
    + ([] if CUDA else [(TOKENS[1], torch.bfloat16, 24), (TOKENS[1], torch.float32, 24)]),
)
def test_hc_post_pre_matches_model(n: int, dtype: torch.dtype, hidden: int) -> None:
    """hc_post fused with the next hc_pre == hc_expand, then hc_mix + hc_collapse of the
    streams it returned (a one-ulp bf16 flip in h_new moves post by ~1e-4 in any
    implementation, so the second stage is checked on the kernel's own h_new)."""
    config = CONFIG.replace(hidden_size=hidden)
    g = torch.Generator().manual_seed(50 + n)
    res = torch.randn(n, S, hidden, generator=g).to(DEVICE, dtype)
    y = torch.randn(n, hidden, generator=g).to(DEVICE, dtype)
    post = (2 * torch.rand(n, S, generator=g)).to(DEVICE)
    comb = torch.rand(n, S, S, generator=g).to(DEVICE)
    K = S * hidden
    fn = (torch.randn(M, K, generator=g) * K**-0.5).to(DEVICE)
    scale = (torch.randn(3, generator=g) * 0.2 + 1.0).to(DEVICE)
    base = (torch.randn(M, generator=g) * 0.5).to(DEVICE)
    h_want = hc_expand(y[None], res[None], post[None], comb[None])
    with mode("triton"):
        h_new, x, post2, comb2 = hc.hc_post_pre(y, res, post, comb, fn, scale, base, config)
    assert_close(h_new, h_want[0], name="h_new", **tol(dtype))
    pre, post_want, comb_want = hc_mix(h_new[None], fn, scale, base, config)
    x_want = hc_collapse(h_new[None], pre)[0]
    assert_close(post2, post_want[0], name="post", **F32_TOL)
    assert_close(comb2, comb_want[0], name="comb", **F32_TOL)
    assert_close(x, x_want, name="x", **tol(dtype))


@pytest.mark.parametrize(
    ("n", "dtype", "config"),
    [(n, dtype, CONFIG) for n in TOKENS[:2] for dtype in (torch.bfloat16, torch.float32)]
    + [(TOKENS[1], torch.float32, LOUD)],
)
def test_hc_head_matches_model(n: int, dtype: torch.dtype, config: ModelConfig) -> None:
    h = streams(n, dtype, seed=30 + n)
    fn, scale, base = make_mix(S, seed=40 + n)
    want = hc_head(h.unsqueeze(0), fn, scale, base, config)[0]
    with mode("triton"):
        got = hc.hc_head(h, fn, scale, base, config)
    assert_close(got, want, name="head x", **tol(dtype))


@pytest.mark.parametrize("which", ["pre", "post_pre", "head"])
@pytest.mark.parametrize("n", TOKENS[:2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_norm_is_rmsnorm_of_x(which: str, n: int, dtype: torch.dtype) -> None:
    """norm=(weight, eps): x comes out as rmsnorm(x, weight, eps) of the unfused x, while post
    and comb stay what they were up to fp32 summation order (eps 0.5 so that a dropped or
    misplaced eps shows)."""
    from engine.kernels.rmsnorm_rope import rmsnorm

    g = torch.Generator().manual_seed(70 + n)
    weight = (torch.rand(HIDDEN, generator=g) + 0.5).to(DEVICE, dtype)
    norm = (weight, 0.5)
    h = streams(n, dtype, seed=60 + n)
    y = streams(n, dtype, seed=61 + n)[:, 0].contiguous()
    post = (2 * torch.rand(n, S, generator=g)).to(DEVICE)
    comb = torch.rand(n, S, S, generator=g).to(DEVICE)
    fn, scale, base = make_mix(S if which == "head" else M, seed=62 + n)

    def run(norm_arg):
        if which == "pre":
            return hc.hc_pre(h, fn, scale, base, CONFIG, norm=norm_arg)
        if which == "head":
            return (hc.hc_head(h, fn, scale, base, CONFIG, norm=norm_arg),)
        return hc.hc_post_pre(y, h, post, comb, fn, scale, base, CONFIG, norm=norm_arg)[1:]

    with mode("triton"):
        plain, fused = run(None), run(norm)
    want = rmsnorm(plain[0], weight, 0.5)  # the reference rmsnorm (outside the switch)
    assert fused[0].dtype == dtype
    assert_close(fused[0], want, name=f"{which} normed x", **tol(dtype))
    for got, ref in zip(fused[1:], plain[1:], strict=True):  # another grid: another sum order
        assert_close(got, ref, name=f"{which} post / comb", **F32_TOL)


def test_norm_too_wide_to_fuse_takes_the_norm_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows wider than MAX_NORM_HIDDEN: the collapse as usual, then the norm kernel."""
    from engine.kernels.rmsnorm_rope import rmsnorm

    monkeypatch.setattr(hc, "MAX_NORM_HIDDEN", HIDDEN // 2)
    h = streams(3, torch.bfloat16, seed=80)
    fn, scale, base = make_mix(M, seed=81)
    weight = torch.rand(HIDDEN, generator=torch.Generator().manual_seed(82)).to(DEVICE) + 0.5
    with mode("triton"):
        plain = hc.hc_pre(h, fn, scale, base, CONFIG)
        fused = hc.hc_pre(h, fn, scale, base, CONFIG, norm=(weight.bfloat16(), 1e-6))
        want = rmsnorm(plain[0], weight.bfloat16(), 1e-6)
    assert torch.equal(fused[0], want)


def test_comb_is_doubly_stochastic() -> None:
    """Sinkhorn's point: after 20 iterations (ending on a column step) comb's columns sum to
    1 (up to eps) and its rows nearly so, so mixing neither grows nor shrinks the streams."""
    h = streams(5, torch.float32, seed=2)
    fn, scale, base = make_mix(M, seed=3)
    with mode("triton"):
        _, _, comb = hc.hc_pre(h, fn, scale, base, CONFIG)
    ones = torch.ones(5, S, device=DEVICE)
    assert_close(comb.sum(dim=1), ones, name="column sums", atol=1e-5, rtol=0)
    assert_close(comb.sum(dim=2), ones, name="row sums", atol=1e-3, rtol=0)


def test_rejects_bad_inputs() -> None:
    h = streams(2, torch.float32, seed=0)
    fn, scale, base = make_mix(M, seed=0)
    with pytest.raises(ValueError, match="fn must be float32"):
        hc.hc_pre(h, fn[:-1], scale, base, CONFIG)
    with pytest.raises(ValueError, match="3 scales"):
        hc.hc_pre(h, fn, scale[:1], base, CONFIG)
    with pytest.raises(ValueError, match="hc_post wants"):
        hc.hc_post(h[:, 0], h, torch.ones(2, S + 1, device=DEVICE), torch.ones(2, S, S))
    with mode("triton"), pytest.raises(ValueError, match="contiguous"):
        hc.hc_pre(h.transpose(1, 2).contiguous().transpose(1, 2), fn, scale, base, CONFIG)


# -------------------------------------------------------------------------------------------
# The model through the kernels (tiny fp32 model: the kernels' fp32 sums only reorder)
# -------------------------------------------------------------------------------------------
def test_block_forward_matches_reference() -> None:
    model = tiny_model(seed=1).to(DEVICE)
    tokens = random_tokens(2, 6, seed=2).to(DEVICE)
    h = torch.randn(2, 6, model.config.hc_mult, model.config.hidden_size).to(tokens.device)
    outs = {}
    for name in ("reference", "triton"):
        state = model.new_state(batch_size=2, max_len=16)
        batch = model._batch(tokens, state, None, state.lengths)
        with mode(name):
            outs[name] = model.layers[0](h, tokens, batch)  # window layer, hash routing
    assert_close(outs["triton"], outs["reference"], name="Block.forward", atol=1e-5, rtol=1e-4)


def test_model_logits_match_reference() -> None:
    """Every Block and the head collapse through the kernels: prefill then one decode step."""
    model = tiny_model(seed=0).to(DEVICE)
    tokens = random_tokens(1, 7, seed=5).to(DEVICE)
    logits = {}
    for name in ("reference", "triton"):
        state = model.new_state(batch_size=1, max_len=16)
        with mode(name):
            first = model(tokens[:, :6], state, last_only=True)
            step = model(tokens[:, 6:], state, last_only=True)
        logits[name] = torch.stack([first, step])
    assert_close(logits["triton"], logits["reference"], name="logits", atol=1e-4, rtol=1e-4)
