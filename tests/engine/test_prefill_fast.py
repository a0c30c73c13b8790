"""The prefill forward's fast path (engine/attention.py through the decode attention and
indexer kernels, each query token a row; engine/moe.py through the grouped expert kernels) against the
reference path, on the tiny model: a prompt crossing the window (8), many ratio-4 entries
with the indexer's top-k rejecting some, and a ratio-128 boundary, in one chunk and in two.

fp32 with QAT off: the two paths differ only in fp32 summation order (the kernels run exact
fp32 dots), so logits and every state tensor agree to 2e-5 of their largest value (the decode
tests' bound, test_decode.py); a wrong key, entry or expert moves them by O(1).
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine.cache import BatchState
from engine.config import RATIO_SPARSE
from engine.kernels import mode
from engine.kv import SlotPool
from engine.moe import FAST_MAX_TOKENS
from tests.engine.conftest import DEVICE, random_tokens, tiny_model

TOL = 2e-5
LENGTH = 150  # > 128 (a ratio-128 entry), > FAST_MAX_TOKENS (the grouped expert kernels)


@functools.cache
def _model():
    return tiny_model(seed=5, sliding_window=8)


def _prefill(model, prompt: torch.Tensor, chunks: list[int], kernel_mode: str):
    pool = SlotPool(model.config, max_seqs=1, max_len=LENGTH + 8, device=DEVICE,
                    dtype=torch.float32)
    seq = pool.sequence_state(pool.acquire())
    state, start, logits = BatchState([seq]), 0, []
    with mode(kernel_mode):
        for n in chunks:
            logits.append(model(prompt[:, start : start + n], state))
            start += n
    return torch.cat(logits, dim=1), seq


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(autouse=True)
def other_kernels_on_the_reference(monkeypatch):
    """The hyper-connection and router kernels (tested on their own, and by the decode
    tests) take their references here: in the CPU interpreter they cost minutes for a
    150-token prefill, and this file is about the attention and expert kernels."""
    import engine.kernels.hc as hc
    from engine.moe import MoE

    monkeypatch.setattr(hc, "use_triton", lambda t: False)
    monkeypatch.setattr(MoE, "_route_fast", lambda self, flat, ids: self.gate.route(flat, ids))


@pytest.mark.parametrize("chunks", [[LENGTH], [80, LENGTH - 80]], ids=["one", "two"])
def test_fast_prefill_equals_the_reference(chunks, monkeypatch):
    import engine.attention as attention
    import engine.kernels.grouped_experts as ge

    calls = {"attention": 0, "experts": 0, "indexer": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    model = _model()
    c = model.config
    assert min(chunks) > FAST_MAX_TOKENS and LENGTH > 128 > c.sliding_window
    prompt = random_tokens(1, LENGTH, seed=9)
    want, ref_seq = _prefill(model, prompt, chunks, "reference")
    monkeypatch.setattr(attention, "gathered_attention",
                        counting("attention", attention.gathered_attention))
    monkeypatch.setattr(ge, "grouped_experts", counting("experts", ge.grouped_experts))
    monkeypatch.setattr(attention, "indexer_scores", counting("indexer", attention.indexer_scores))
    got, fast_seq = _prefill(model, prompt, chunks, "triton")
    # the comparison is only worth something if the fast path ran the kernels
    sparse = sum(c.compress_ratio(i) == RATIO_SPARSE for i in range(c.num_hidden_layers))
    assert sparse and calls == {"attention": c.num_hidden_layers * len(chunks),
                                "experts": c.num_hidden_layers * len(chunks),
                                "indexer": sparse * len(chunks)}, calls
    assert _rel(got, want) < TOL, f"logits differ by {_rel(got, want):.2e}"
    assert (got.argmax(-1) == want.argmax(-1)).all()
    for i, (a, b) in enumerate(zip(fast_seq.layers, ref_seq.layers, strict=True)):
        for name, t in vars(b).items():
            if isinstance(t, torch.Tensor):
                u = getattr(a, name)
                finite = torch.isfinite(t)  # compressor score rows start at -inf
                assert torch.equal(finite, torch.isfinite(u)), (i, name)
                assert _rel(u[finite], t[finite]) < TOL, (i, name, _rel(u[finite], t[finite]))
