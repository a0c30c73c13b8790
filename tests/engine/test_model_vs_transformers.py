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
    assert replay.checked >= MIN_CHECKED * replay.total, f"only {replay.checked}/{replay.total} clear margins"


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
    assert diff.max().item() < ATOL, f"max |diff| {diff.max().item():.2e} at positions {worst.topk(5).indices.tolist()}"


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
        assert (top2[0] - top2[1]).item() > 2 * ATOL, f"step {step}: argmax near-tie in the reference"
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
    x = torch.randn(1, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ids = random_tokens(1, 64, seed=4)
    old_w1, old_w3 = shared.w1.weight.clone(), shared.w3.weight.clone()
    try:
        with torch.no_grad():
            for w in (shared.w1.weight, shared.w3.weight, theirs.shared_experts.gate_proj.weight,
                      theirs.shared_experts.up_proj.weight):
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
            assert (routed_ours - routed_hf).abs().max() < ATOL * 10  # outputs ~1e2 here: 1e-3 is ~1e-5 relative
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
