"""The engine's forward against `transformers`' DeepseekV4ForCausalLM (an independent
implementation, spec section 7) on ModelConfig.tiny() random weights, QAT off, fp32.

Tolerance: logits are compared with atol 1e-4 (logits here have std ~1, max ~6). Both sides
compute in fp32 but reduce in different orders (einsum vs matmul, fused vs split norms);
measured differences are ~2e-5 after six layers, i.e. a few hundred fp32 ulps at |logit| ~5.
A real semantic slip (a position off by one, a missing compressed entry, a wrong sink or
rope dim) moves logits by 1e-2 to 1, so 1e-4 separates the two by two orders of magnitude.

Routing and indexer top-k decisions with near-ties are implementation defined (spec
section 7; a 300-token prompt has router gaps down to ~1e-6). So the reference replays the
engine's recorded decisions (`hf_reference.Replay`) and must make the SAME decision on its
own wherever the engine's margin exceeds CLEAR (1e-4, ~100x the ~1e-6 score difference of
two fp32 implementations); the tests require that to cover most rows.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import fp4_roundtrip, fp8_roundtrip, hadamard
from engine.config import RATIO_SPARSE, RATIO_WINDOW
from engine.moe import MoE
from engine.rope import rope_inv_freq
from tests.engine.conftest import DEVICE, random_tokens, tiny_model

transformers = pytest.importorskip("transformers")
from tests.engine.hf_reference import Replay, build_hf_model  # noqa: E402

ATOL = 1e-4
CLEAR = 1e-4
MIN_CHECKED = 0.9  # fraction of top-k decisions that must have a clear margin
PROMPT_LEN = 300  # crosses the 128 window, entries of ratio 4 (75) and 128 (2), index_topk 8


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    hf = build_hf_model(model).to(DEVICE)
    return model, hf


def _check_replay(replay: Replay) -> None:
    assert replay.disagreements == 0, f"{replay.disagreements} clear-margin top-k decisions differ"
    assert replay.checked >= MIN_CHECKED * replay.total, (
        f"only {replay.checked}/{replay.total} clear margins"
    )


def test_logits_match_transformers(pair, selections, monkeypatch):
    model, hf = pair
    tokens = random_tokens(1, PROMPT_LEN, seed=1)
    ours = model(tokens, model.new_state(1, 512))
    rejected = [bool((sel.sum(-1) < (sel.shape[1])).any()) for sel, _ in selections.indexes]
    assert any(rejected), "the indexer top-k never had to reject an entry"
    replay = Replay(monkeypatch, selections, CLEAR)
    with torch.no_grad():
        ref = hf(tokens).logits
    _check_replay(replay)
    diff = (ours - ref).abs()
    worst = diff.amax(-1)[0]
    assert diff.max().item() < ATOL, (
        f"max |diff| {diff.max().item():.2e} at positions {worst.topk(5).indices.tolist()}"
    )


def test_greedy_continuation_matches_transformers(pair, selections, monkeypatch):
    """32 greedy tokens after a 100-token prompt: positions 100..131 cross the 128-token
    window and the first ratio-128 entry (emitted at position 127). Reference: the HF
    model's own cached generation, decoding one token per step like us."""
    model, hf = pair
    prompt = random_tokens(1, 100, seed=6)  # its greedy steps have top-2 gaps >= 0.03
    state = model.new_state(1, 256)
    logits = model(prompt, state, last_only=True)  # [1, V]
    tokens, step_logits = [], [logits]
    for _ in range(32):
        nxt = int(logits.argmax(-1))
        tokens.append(nxt)
        logits = model(torch.tensor([[nxt]], device=DEVICE), state, last_only=True)
        step_logits.append(logits)

    replay = Replay(monkeypatch, selections, CLEAR)
    with torch.no_grad():
        out = hf.generate(
            prompt,
            max_new_tokens=32,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    ref_tokens = out.sequences[0, 100:].tolist()
    _check_replay(replay)
    assert len(out.logits) == 32
    for step, (a, b) in enumerate(zip(step_logits, out.logits, strict=False)):
        top2 = b[0].topk(2).values
        # with |ours - ref| < ATOL everywhere, a gap over 2*ATOL makes the argmax well defined
        assert (top2[0] - top2[1]).item() > 2 * ATOL, (
            f"step {step}: argmax near-tie in the reference"
        )
        assert (a - b).abs().max().item() < ATOL, f"step {step}: logits differ"
    assert tokens == ref_tokens


def test_shared_expert_follows_deepseek_not_transformers(pair):
    """DeepSeek clamps only the routed experts' SwiGLU (at swiglu_limit 10); `transformers`
    also clamps the shared expert. Random weights never reach 10, so scale the shared
    expert's w1/w3 x50 to drive its pre-activations far past the limit."""
    model, hf = pair
    layer = 3
    ours: MoE = model.layers[layer].ffn
    theirs = hf.model.layers[layer].mlp
    shared = ours.shared_experts
    x = torch.randn(1, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(
        DEVICE
    )
    ids = random_tokens(1, 64, seed=4)
    old_w1, old_w3 = shared.w1.weight.clone(), shared.w3.weight.clone()
    try:
        with torch.no_grad():
            for w in (
                shared.w1.weight,
                shared.w3.weight,
                theirs.shared_experts.gate_proj.weight,
                theirs.shared_experts.up_proj.weight,
            ):
                w.mul_(50.0)
            g, u = x @ shared.w1.weight.T, x @ shared.w3.weight.T
            limit = model.config.swiglu_limit
            assert g.max() > 2 * limit and u.abs().max() > 2 * limit, "test did not reach the clamp"
            unclamped_shared = (torch.nn.functional.silu(g) * u) @ shared.w2.weight.T
            y_ours = ours(x, ids)
            y_hf = theirs(x, input_ids=ids)
            # routed parts agree (both clamp those); the shared parts differ by the clamp
            routed_ours = y_ours - unclamped_shared
            routed_hf = y_hf - theirs.shared_experts(x)
            assert (
                routed_ours - routed_hf
            ).abs().max() < ATOL * 10  # outputs ~1e2 here: 1e-3 is ~1e-5 relative
            assert (y_ours - y_hf).abs().max() > 1.0
    finally:
        with torch.no_grad():
            shared.w1.weight.copy_(old_w1)
            shared.w3.weight.copy_(old_w3)
            theirs.shared_experts.gate_proj.weight.copy_(old_w1)
            theirs.shared_experts.up_proj.weight.copy_(old_w3)


def test_rope_frequencies_match_transformers(pair):
    """Window layers: plain base 10000; compressed layers: base 160000 with YaRN, no mscale."""
    model, hf = pair
    rotary = hf.model.rotary_emb
    cfg = model.config
    for ratio, kind in ((RATIO_WINDOW, "main"), (RATIO_SPARSE, "compress")):
        ours = rope_inv_freq(cfg, ratio)
        theirs = getattr(rotary, f"{kind}_inv_freq").cpu()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        assert getattr(rotary, f"{kind}_attention_scaling") == 1.0
    assert not torch.allclose(rope_inv_freq(cfg, RATIO_WINDOW), rope_inv_freq(cfg, RATIO_SPARSE))


# ---------------------------------------------------------------------------------------------
# QAT pieces: `transformers` has none of them, so they are checked against their definitions.
# ---------------------------------------------------------------------------------------------
def test_fp8_roundtrip_is_e4m3_with_power_of_two_block_scales():
    x = torch.randn(4, 448, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 3, 448)
    y = fp8_roundtrip(x)
    blocks, yb = x.view(4, 7, 64), y.view(4, 7, 64)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True) / 448)))
    codes = yb / scale
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # representable in e4m3
    assert codes.abs().max() <= 448
    # e4m3 keeps 3 mantissa bits: normal values are within 2^-4 relative
    normal = (blocks / scale).abs() >= 2**-6
    assert ((yb - blocks).abs() <= 2**-4 * blocks.abs())[normal].all()
    assert torch.equal(fp8_roundtrip(y), y)  # idempotent


def test_fp4_roundtrip_lands_on_the_e2m1_grid():
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(6))
    y = fp4_roundtrip(x)
    scale = torch.exp2(torch.ceil(torch.log2(x.view(8, 4, 32).abs().amax(-1, keepdim=True) / 6)))
    codes = (y.view(8, 4, 32) / scale).abs()
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert (codes.unsqueeze(-1) == grid).any(-1).all()
    # nearest grid point: the error is at most half the widest gap (2 between 4 and 6)
    assert ((y - x).abs().view(8, 4, 32) <= scale).all()
    assert torch.equal(fp4_roundtrip(y), y)


def test_hadamard_is_orthonormal_so_qat_off_may_skip_it():
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(7))
    k = torch.randn(9, 128, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(hadamard(x) @ hadamard(k).T, x @ k.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(x)), x, rtol=1e-5, atol=1e-5)


def test_qat_switch_changes_the_numerics():
    """Same weights, QAT on vs off: the FP8/FP4 rounding must visibly move the logits (spec
    section 7 reports up to ~30% of the top logit on random tiny models)."""
    off = tiny_model(seed=0)
    on = tiny_model(seed=0, qat=True)
    tokens = random_tokens(1, 40, seed=9)
    diff = (on(tokens, on.new_state(1, 64)) - off(tokens, off.new_state(1, 64))).abs().max()
    assert diff > 1e-2


def test_bf16_path_tracks_fp32_on_the_same_weights():
    """The real checkpoints run in bf16 (spec section 6: bf16 activations, fp32 hc/router/
    compressor/head math). On identical bf16 weights the bf16 forward stays within bf16
    rounding of the fp32 one over the first 16 positions (before routing flips cascade):
    mean |diff| measured ~0.015 on logits of std ~1, bound 0.05."""
    b16 = tiny_model(seed=0, dtype=torch.bfloat16)
    f32 = tiny_model(seed=0)
    f32.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in b16.state_dict().items()}
    )
    tokens = random_tokens(1, 16, seed=12)
    state = b16.new_state(1, 64)
    low = b16(tokens, state)
    assert state[0].layers[2].entries.dtype == torch.bfloat16 and low.dtype == torch.float32
    high = f32(tokens, f32.new_state(1, 64))
    assert low.isfinite().all()
    assert (low - high).abs().mean().item() < 0.05
