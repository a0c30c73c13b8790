"""engine/sampling.py: greedy, seeds, top-k / top-p support sets, the mask hook, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.sampling import Sampler, SamplingParams, filter_min_p, filter_top_k_top_p

V = 50


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 300) -> set[int]:
    return {int(Sampler(dataclasses.replace(params, seed=s), "cpu")(logits))
            for s in range(n)}


def test_greedy_is_argmax():
    for seed in range(5):
        logits = _logits(seed)
        assert int(Sampler(SamplingParams(temperature=0), "cpu")(logits)) == int(logits.argmax())


def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = torch.zeros(V)  # uniform: every seed's draw is a fresh coin
    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), "cpu")
        return [int(sampler(logits)) for _ in range(20)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_support():
    logits = _logits(1)
    top = set(torch.topk(logits, 3).indices.tolist())
    seen = _draws(SamplingParams(temperature=5.0, top_k=3), logits)
    assert seen == top  # high temperature: all three show up in 300 draws, nothing else


def test_top_p_support_includes_the_crossing_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.7))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.5))
    assert kept.tolist() == [True, False, False, False]  # the top token alone reaches 0.5
    seen = _draws(SamplingParams(temperature=1.0, top_p=0.7), logits, n=200)
    assert seen == {0, 1}


def test_top_k_then_top_p_and_rows():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    kept = torch.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), "cpu")
    counts = torch.bincount(torch.stack([sampler(probs.log()) for _ in range(3000)]), minlength=3)
    # 3000 draws: the binomial standard deviation of each share is <= 0.0092; 4 sigma.
    assert torch.allclose(counts / 3000, probs, atol=0.037)


def test_mask_tensor_and_callable():
    logits = _logits(2)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 11]] = True
    seen = _draws(SamplingParams(temperature=10.0, logits_mask=allowed), logits, n=100)
    assert seen == {3, 11}
    greedy = Sampler(SamplingParams(temperature=0, logits_mask=allowed), "cpu")
    assert int(greedy(logits)) == (3 if logits[3] > logits[11] else 11)

    calls = []
    def only_after(token_ids, lg):
        calls.append(list(token_ids))
        out = torch.full_like(lg, float("-inf"))
        out[token_ids[-1] + 1] = 0.0
        return out
    sampler = Sampler(SamplingParams(temperature=0.7, seed=1, logits_mask=only_after), "cpu")
    assert int(sampler(logits, [5, 9])) == 10
    assert calls == [[5, 9]]


def test_mask_that_allows_nothing_is_an_error():
    sampler = Sampler(SamplingParams(logits_mask=torch.zeros(V, dtype=torch.bool)), "cpu")
    with pytest.raises(ValueError, match="allows no token"):
        sampler(_logits())
    with pytest.raises(ValueError, match="bool tensor"):
        Sampler(SamplingParams(logits_mask=torch.zeros(V)), "cpu")(_logits())


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


# -- issue 12: min-p, logit bias, penalties, logprobs -------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"logprobs": -1}, "logprobs"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
])
def test_invalid_new_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_min_p_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(filter_min_p(probs.log(), 0.2))  # floor 0.1: drops 0.05 only
    assert kept.tolist() == [True, True, True, False]
    seen = _draws(SamplingParams(temperature=1.0, min_p=0.5), probs.log(), n=300)
    assert seen == {0, 1}  # floor 0.25


def test_logit_bias_steers_and_bans():
    logits = _logits(3)
    top, low = int(logits.argmax()), int(logits.argmin())
    greedy = Sampler(SamplingParams(temperature=0, logit_bias={low: 100.0}), "cpu")
    assert int(greedy(logits)) == low
    banned = Sampler(SamplingParams(temperature=0, logit_bias={top: -100.0}), "cpu")
    assert int(banned(logits)) == int(logits.topk(2).indices[1])
    with pytest.raises(ValueError, match="out of range"):
        Sampler(SamplingParams(logit_bias={V: 1.0}), "cpu")(logits)


def test_frequency_and_presence_count_the_output_only():
    logits = torch.zeros(V)
    logits[7], logits[9] = 2.0, 1.0  # token 7 leads by 1.0
    prompt = [7, 7, 7, 7]  # in the prompt only: no frequency/presence penalty
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.6), "cpu")
    assert int(sampler(logits, prompt)) == 7
    assert int(sampler(logits, [*prompt, 7])) == 7  # one in the output: 2.0 - 0.6 > 1.0
    assert int(sampler(logits, [*prompt, 7, 7])) == 9  # two: 2.0 - 1.2 < 1.0
    presence = Sampler(SamplingParams(temperature=0, presence_penalty=0.6), "cpu")
    assert int(presence(logits, prompt)) == 7
    assert int(presence(logits, [*prompt, 7])) == 7
    assert int(presence(logits, [*prompt, 7, 7])) == 7  # presence counts once: 1.4 > 1.0
    strong = Sampler(SamplingParams(temperature=0, presence_penalty=1.5), "cpu")
    assert int(strong(logits, prompt)) == 7
    assert int(strong(logits, [*prompt, 7])) == 9


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.full((V,), -1.0)
    logits[3], logits[4], logits[5] = 2.0, 1.5, -0.5
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), "cpu")
    assert int(sampler(logits, [3])) == 4  # 3 in the prompt: 2.0 / 2 = 1.0 < 1.5
    # A negative logit is multiplied (HF/vLLM), so a seen token gets less likely either way.
    only_neg = torch.full((V,), -1.0)
    only_neg[5] = -0.6
    assert int(Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), "cpu")(
        only_neg, [5])) != 5  # -1.2 < -1.0


def test_penalties_follow_a_growing_sequence():
    """Each call's token_ids grows by one token (what engine.runtime passes): each new token
    is counted once, whatever the earlier calls counted."""
    logits = torch.zeros(V)
    logits[1] = 5.0
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0), "cpu")
    ids = [0]
    out = []
    for _ in range(8):
        token = int(sampler(logits, ids))
        out.append(token)
        ids.append(token)
    # Token 1 wins while 5 - count > 0; at 0 it ties the zeros and argmax takes the lowest
    # id (0, in the prompt only: unpenalized); then 0 is at -1 and 1 ties the rest again.
    assert out == [1, 1, 1, 1, 1, 0, 1, 2]


def test_logprobs_are_the_models_own():
    logits = _logits(4)
    expected = torch.log_softmax(logits, -1)
    sampler = Sampler(SamplingParams(temperature=0.7, seed=1, logprobs=3,
                                     logit_bias={0: 50.0}), "cpu")
    token = int(sampler(logits))
    assert token == 0  # the bias decided the draw ...
    lp = sampler.take_logprobs()
    assert lp is not None and sampler.take_logprobs() is None  # once
    assert lp.logprob == pytest.approx(float(expected[0]))  # ... not the logprob
    top = expected.topk(3)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(top.values.tolist())
    assert Sampler(SamplingParams(), "cpu").take_logprobs() is None
