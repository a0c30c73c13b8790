"""engine/runtime.py on the tiny random checkpoint: stops, seeds, batching, cancellation,
and an event loop that stays live.

A tiny-model decode step takes about a second on a shared 2-core CPU, so every generation
here is a handful of tokens. Tokens are forced with the logits-mask hook where a test needs
a particular text (the random model's own choices are nonsense).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dsml.tokenizer import load_tokenizer
from engine.make_checkpoint import write_checkpoint
from engine.runtime import Engine, StopStrings, default_device
from engine.sampling import SamplingParams

EOS = 1
PROMPT = [0, 128803, 5, 77, 128804]  # BOS <｜User｜> .. <｜Assistant｜>


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)
    engine = Engine.from_checkpoint(path, device=default_device())
    yield engine
    engine.close()


def _forcing(sequence: list[int]):
    """A mask that makes generated token i be sequence[i] (the hook sees prompt + generated)."""
    def mask(token_ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[sequence[len(token_ids) - len(PROMPT)]] = 0.0
        return out
    return mask


async def _collect(engine, params, prompt=PROMPT):
    return [step async for step in engine.stream(prompt, params)]


async def test_max_tokens_ends_with_length(engine):
    steps = await _collect(engine, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(steps) == 3
    assert [s.finish_reason for s in steps] == [None, None, "length"]
    text = "".join(s.text for s in steps)
    assert text == load_tokenizer().decode([s.token_id for s in steps])


async def test_greedy_and_seeded_runs_repeat(engine):
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    first = [t async for t in engine.generate(PROMPT, greedy)]
    assert first == [t async for t in engine.generate(PROMPT, greedy)]
    seeded = SamplingParams(max_tokens=3, temperature=1.0, seed=5, ignore_eos=True)
    assert [t async for t in engine.generate(PROMPT, seeded)] == \
           [t async for t in engine.generate(PROMPT, seeded)]


async def test_eos_stops_and_keeps_its_text(engine):
    hello = load_tokenizer().encode_text("Hi")
    steps = await _collect(engine, SamplingParams(max_tokens=10, logits_mask=_forcing([*hello, EOS])))
    assert [s.token_id for s in steps] == [*hello, EOS]
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == "Hi<｜end▁of▁sentence｜>"


async def test_text_held_for_a_stop_string_is_released_at_eos(engine):
    ids = load_tokenizer().encode_text("Hi")
    # The EOS text ends with "sentence｜>", which might start the stop string: held back,
    # then released because EOS ends the generation.
    params = SamplingParams(max_tokens=10, stop=("sentence｜>!",), logits_mask=_forcing([*ids, EOS]))
    steps = await _collect(engine, params)
    assert "".join(s.text for s in steps) == "Hi<｜end▁of▁sentence｜>"


async def test_stop_token_ids(engine):
    ids = load_tokenizer().encode_text("one two three")
    params = SamplingParams(max_tokens=10, stop_token_ids=(ids[1],), logits_mask=_forcing(ids))
    steps = await _collect(engine, params)
    assert [s.token_id for s in steps] == ids[:2] and steps[-1].finish_reason == "stop"


async def test_stop_string_is_cut_and_held_back(engine):
    tok = load_tokenizer()
    ids = tok.encode_text("alpha beta gamma delta")
    params = SamplingParams(max_tokens=len(ids), stop=("a gam",), logits_mask=_forcing(ids))
    steps = await _collect(engine, params)
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == "alpha bet"
    # "alpha" and "beta" end in "a", which might start "a gam": each "a" is held back until
    # the next token decides, so " beta" releases alpha's "a" and keeps its own.
    beta = next(i for i, s in enumerate(steps) if tok.decode([s.token_id]) == " beta")
    assert steps[beta].text == "a bet"
    assert all(not s.text.endswith("a") for s in steps)


@pytest.fixture(scope="module")
def engine_fp32(tmp_path_factory):
    # fp32 activations: a batched matmul and a single-row one agree to rounding, so greedy
    # choices on a random model cannot flip between them (bf16 could, on near-ties).
    path = write_checkpoint(tmp_path_factory.mktemp("tiny32"), seed=1)
    engine = Engine.from_checkpoint(path, device=default_device(), dtype=torch.float32)
    yield engine
    engine.close()


async def test_concurrent_sequences_batch_and_match_running_alone(engine_fp32):
    engine = engine_fp32
    prompts = [PROMPT, [0, 128803, 900, 901, 902, 903, 904, 128804], [0, 42]]
    lengths = [4, 2, 5]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    alone = [await _collect(engine, p, prompt) for p, prompt in zip(params, prompts, strict=True)]

    widest = 0
    decode = engine._decode

    def watching(batch):
        nonlocal widest
        widest = max(widest, len(batch))
        return decode(batch)

    engine._decode = watching
    try:
        together = await asyncio.gather(*(_collect(engine, p, prompt)
                                          for p, prompt in zip(params, prompts, strict=True)))
    finally:
        engine._decode = decode
    assert widest == 3  # all three decoded in one forward
    assert [[s.token_id for s in r] for r in together] == [[s.token_id for s in r] for r in alone]
    assert [r[-1].finish_reason for r in together] == ["length"] * 3
    assert engine.num_running == 0


async def test_a_failing_row_does_not_fail_the_batch(engine_fp32):
    engine = engine_fp32

    def banned_after_first(token_ids, logits):
        if len(token_ids) > len(PROMPT):
            return torch.full_like(logits, float("-inf"))
        return logits

    bad = SamplingParams(max_tokens=3, temperature=0, logits_mask=banned_after_first)
    good = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    results = await asyncio.gather(_collect(engine, bad), _collect(engine, good),
                                   return_exceptions=True)
    assert isinstance(results[0], ValueError) and "allows no token" in str(results[0])
    assert [s.finish_reason for s in results[1]] == [None, None, "length"]


async def test_cancelling_the_consumer_stops_generation(engine):
    calls = 0
    decode = engine._decode

    def counting(*args):
        nonlocal calls
        calls += 1
        return decode(*args)

    engine._decode = counting
    try:
        seen = []

        async def consume():
            async for token in engine.generate(PROMPT, SamplingParams(max_tokens=1000, ignore_eos=True)):
                seen.append(token)

        task = asyncio.create_task(consume())
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
        calls_at_cancel = calls
        # The engine is free again at once (no lock left held), and no decode runs for the
        # cancelled sequence beyond the one that was in flight. That one is counted when the
        # worker thread starts it, which on a loaded machine can be just after the cancel:
        # at most one call may come after calls_at_cancel, and none after it.
        steps = await asyncio.wait_for(
            _collect(engine, SamplingParams(max_tokens=1, temperature=0)), timeout=60)
        assert len(steps) == 1
        assert calls - calls_at_cancel <= 1
        settled = calls
        await asyncio.sleep(0.5)
        assert calls == settled
        assert len(seen) < 5
    finally:
        engine._decode = decode


async def test_aclose_frees_the_engine(engine):
    gen = engine.generate(PROMPT, SamplingParams(max_tokens=1000, ignore_eos=True))
    await anext(gen)
    await gen.aclose()
    steps = await asyncio.wait_for(_collect(engine, SamplingParams(max_tokens=1)), timeout=60)
    assert steps[-1].finish_reason in ("length", "stop")


async def test_event_loop_stays_responsive(engine):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _collect(engine, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    elapsed = loop.time() - start
    task.cancel()
    # The forwards run on the worker thread: the ticker keeps running meanwhile (at least a
    # quarter of the ticks a free loop would make, allowing for a loaded CI machine).
    assert ticks >= elapsed / 0.01 / 4


async def test_bad_prompts_are_rejected(engine):
    with pytest.raises(ValueError, match="at least one token"):
        await _collect(engine, SamplingParams(max_tokens=1), prompt=[])
    with pytest.raises(ValueError, match="prompt_ids must be in"):
        await _collect(engine, SamplingParams(max_tokens=1), prompt=[0, 10**7])
    with pytest.raises(ValueError, match="max_seq_len"):
        await _collect(engine, SamplingParams(max_tokens=engine.max_seq_len))


@pytest.mark.parametrize("chunks, stops, emitted, stopped", [
    (["Hello wor", "ld!"], ["world"], ["Hello ", ""], True),
    (["ab", "c", "d"], ["abd"], ["", "abc", "d"], False),
    (["xx", "STO", "P tail"], ["STOP", "TOPS"], ["xx", "", ""], True),
    (["a", "b"], [], ["a", "b"], False),
])
def test_stop_strings_hold_back_only_possible_prefixes(chunks, stops, emitted, stopped):
    matcher = StopStrings(stops)
    results = [matcher.feed(c) for c in chunks]
    out = [text for text, _ in results]
    assert out[: len(emitted)] == emitted
    assert any(s for _, s in results) == stopped
    if not stopped:
        assert "".join(out) + matcher.flush() == "".join(chunks)
