"""Issue 17's prefix cache (engine/kv.py SlotPool, engine/runtime.py Engine) on the tiny model.

A cached slot is continued only from its end (engine/kv.py says why); these tests check that
a continuation is the same computation as a fresh prefill, that the engine caches exactly
the ids its state consumed (the last sampled token is never fed), that the real renderer's
follow-up agent prompt starts with those ids, and that pins, eviction and failures keep the
pool's books straight.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from dsml import render_chat
from dsml.tokenizer import load_tokenizer
from engine import kernels, runtime
from engine.cache import BatchState
from engine.kv import PREFIX_KEY_TOKENS, SlotPool
from engine.make_checkpoint import write_checkpoint
from engine.runner import DecodeRunner
from engine.runtime import Engine
from engine.sampling import SamplingParams
from tests.engine.conftest import DEVICE, random_tokens, tiny_config, tiny_model

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def _ids(n: int, seed: int) -> list[int]:
    return random_tokens(1, n, seed=seed, vocab=1000)[0].tolist()


# -- the pool's books (no model) -------------------------------------------------------------

def _pool(max_seqs: int = 2, prefix_cache: bool = True) -> SlotPool:
    return SlotPool(tiny_config(), max_seqs=max_seqs, max_len=64, dtype=torch.float32,
                    prefix_cache=prefix_cache)


def test_a_prompt_reuses_a_cached_sequence_only_if_it_starts_with_all_of_it():
    pool = _pool()
    base = _ids(20, seed=1)
    slot = pool.acquire()
    pool.release(slot, consumed=base)
    assert pool.num_cached == 1 and pool.num_in_use == 0 and pool.num_free == 2
    assert pool.lookup(base) is None  # equal, not longer: nothing left to prefill
    assert pool.lookup([*base[:-1], base[-1] + 1, 5]) is None  # diverges inside
    diverged_early = [base[0] + 1, *base[1:], 7]
    assert pool.lookup(diverged_early) is None  # another key
    assert pool.acquire_prefix([*base, 3, 4]) == (slot, 20)
    assert pool.num_cached == 0 and pool.num_in_use == 1  # pinned: taken out of the LRU
    assert pool.acquire_prefix([*base, 3, 4])[1] == 0  # the running one is not shared
    s = pool.stats
    assert (s.hits, s.misses, s.tokens_saved, s.evictions) == (1, 1, 20, 0)


def test_the_longest_cached_prefix_wins_and_short_ones_are_not_cached():
    pool = _pool(max_seqs=3)
    base = _ids(30, seed=2)
    for n in (18, 25):
        pool.release(pool.acquire(), consumed=base[:n])
    short = pool.acquire()
    pool.release(short, consumed=base[:PREFIX_KEY_TOKENS])  # not worth caching: freed
    assert pool.num_cached == 2 and pool.cached_tokens(short) is None
    slot, n = pool.acquire_prefix(base)
    assert n == 25 and pool.cached_tokens(slot) is None
    assert pool.acquire_prefix(base)[1] == 18


def test_eviction_is_lru_free_slots_first_and_pinned_slots_never():
    pool = _pool(max_seqs=2)
    a, b = _ids(20, seed=3), _ids(20, seed=4)
    sa = pool.acquire()
    pool.release(sa, consumed=a)
    sb = pool.acquire()  # a free slot first: `a` stays cached
    assert sb != sa and pool.stats.evictions == 0
    pool.release(sb, consumed=b)
    fresh = pool.acquire()  # none free: the least recently cached (a) goes
    assert fresh == sa and pool.stats.evictions == 1
    assert pool.lookup([*a, 1]) is None and pool.lookup([*b, 1]) == (sb, 20)
    pinned = pool.acquire()  # evicts b
    assert pinned == sb
    with pytest.raises(ValueError, match="full"):
        pool.acquire()  # both pinned
    pool.release(fresh)
    pool.release(pinned)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(pinned)


def test_the_cache_off_frees_and_never_hits():
    pool = _pool(prefix_cache=False)
    base = _ids(20, seed=5)
    slot = pool.acquire()
    pool.release(slot, consumed=base)
    assert pool.num_cached == 0
    assert pool.acquire_prefix([*base, 1])[1] == 0 and pool.stats.misses == 0


# -- a continued slot computes what a fresh prefill does -------------------------------------

def test_a_continued_slot_gives_the_logits_of_a_fresh_full_prefill():
    """The cached state was written by a prefill AND decode steps (as in the engine) past the
    window (128) and a ratio-128 boundary; the continuation's logits match a fresh
    single-state prefill of all the tokens."""
    model = tiny_model(seed=0)
    pool = SlotPool(model.config, max_seqs=2, max_len=256, device=DEVICE, dtype=torch.float32,
                    prefix_cache=True)
    runner = DecodeRunner(model, pool)
    prompt = _ids(124, seed=6)
    ids = list(prompt)
    with torch.inference_mode():
        slot = pool.acquire()
        seq = pool.sequence_state(slot, 200)
        logits = model(torch.tensor([prompt], device=DEVICE), BatchState([seq]), last_only=True)
        ids.append(int(logits.argmax()))
        for _ in range(6):  # decode crosses position 127 (ring wrap, first ratio-128 entry)
            tokens, _ = runner.decode([seq], [ids[-1]], [SamplingParams(temperature=0)])
            ids.append(int(tokens[0]))
        assert seq.length == len(ids) - 1  # the last sampled token was never fed
        pool.release(slot, consumed=ids[: seq.length])

        follow = ids + _ids(9, seed=7)
        hit, n = pool.acquire_prefix(follow)
        assert (hit, n) == (slot, len(ids) - 1)
        cont = pool.sequence_state(hit, 200)
        cont.length = n
        got = model(torch.tensor([follow[n:]], device=DEVICE), BatchState([cont]))[0]
        fresh = model.new_state(1, 200, DEVICE)
        want = model(torch.tensor([follow], device=DEVICE), fresh)[0, n:]
    # fp32 model: the decode steps differ from the reference forward by summation order only
    # (engine/decode.py), ~1e-6 relative; 1e-4 leaves room, a missing token is O(1).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# -- the engine: a tool loop with the cache on and off ---------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)


def _engine(path, engine_path: str = "fast", prefix_cache: bool = True,
            max_batch_size: int = 2) -> Engine:
    return Engine.from_checkpoint(path, device=DEVICE, dtype=torch.float32, max_seq_len=256,
                                  max_batch_size=max_batch_size, engine_path=engine_path,
                                  prefix_cache=prefix_cache)


async def _tool_loop(engine: Engine, turns: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt = the previous prompt + what the model generated + a tool result."""
    prompt = [0, *_ids(40, seed=8)]
    prompts, outputs = [], []
    for turn in range(turns):
        out = [t async for t in engine.generate(prompt, GREEDY)]
        prompts.append(prompt)
        outputs.append(out)
        prompt = prompt + out + _ids(7, seed=20 + turn)
    return prompts, outputs


def test_a_five_turn_tool_loop_generates_the_same_tokens_with_the_cache_on_and_off(
        checkpoint, monkeypatch):
    # small prefill chunks: a continuation's chunks start at the cached length, a full
    # prefill's at 0, so the two runs split the prompts differently (exact all the same)
    monkeypatch.setattr(runtime, "PREFILL_CHUNK", 16)
    try:
        on = _engine(checkpoint)
        prompts, with_cache = asyncio.run(_tool_loop(on, 5))
        off = _engine(checkpoint, prefix_cache=False)
        _, without = asyncio.run(_tool_loop(off, 5))
        ref = _engine(checkpoint, engine_path="reference")
        _, reference = asyncio.run(_tool_loop(ref, 5))
        assert with_cache == without == reference
        assert not ref.prefix_cache and ref.stats()["prefix_cache_hits"] == 0
        stats = on.stats()
        assert stats["prefix_cache_hits"] == 4 and stats["prefix_cache_misses"] == 1
        # turn t+1 reuses turn t's prompt + its generated tokens but the last (never fed)
        saved = sum(len(p) + len(o) - 1 for p, o in zip(prompts[:-1], with_cache[:-1], strict=True))
        assert stats["prefix_cache_tokens_saved"] == saved
        assert stats["prefill_tokens"] == stats["prompt_tokens"] - saved
        assert off.stats()["prefill_tokens"] == off.stats()["prompt_tokens"]
        # what stays cached is exactly the last turn's consumed ids
        (slot,) = list(on._pool._cached)
        assert list(on._pool.cached_tokens(slot)) == prompts[-1] + with_cache[-1][:-1]
        assert on._pool.num_in_use == 0 and stats["slots_used"] == 0
    finally:
        for e in ("on", "off", "ref"):
            if e in locals():
                locals()[e].close()
        kernels.set_mode("auto")


def test_a_diverging_prompt_misses_and_slot_pressure_evicts(checkpoint):
    engine = _engine(checkpoint, max_batch_size=2)
    try:
        a, b, c = ([0, *_ids(30, seed=s)] for s in (30, 31, 32))

        async def run(prompt):
            return [t async for t in engine.generate(prompt, GREEDY)]

        out_a = asyncio.run(run(a))
        diverged = [*a[:20], a[20] + 1, *a[21:], *out_a, 5, 6]
        asyncio.run(run(diverged))
        s = engine.stats()
        assert (s["prefix_cache_hits"], s["prefix_cache_misses"]) == (0, 2)
        assert s["prefill_tokens"] == s["prompt_tokens"]  # nothing reused
        out_b = asyncio.run(run(b))  # 2 slots: b evicts a (the LRU), c evicts `diverged`
        asyncio.run(run(c))
        s = engine.stats()
        assert s["prefix_cache_evictions"] == 2 and s["slots_cached"] == 2
        asyncio.run(run(b + out_b + [9, 9]))  # b survived
        assert engine.stats()["prefix_cache_hits"] == 1
        asyncio.run(run(a + out_a + [9, 9]))  # a was evicted
        s = engine.stats()
        assert s["prefix_cache_hits"] == 1 and s["prefix_cache_misses"] == 5
    finally:
        engine.close()


def test_cancellation_and_failures_release_their_pins(checkpoint):
    engine = _engine(checkpoint, max_batch_size=2)
    pool = engine._pool
    try:
        base = [0, *_ids(30, seed=40)]

        async def first_token_then_cancel(prompt):
            stream = engine.stream(prompt, SamplingParams(max_tokens=8, temperature=0,
                                                          ignore_eos=True))
            step = await stream.__anext__()
            await stream.aclose()
            await engine._scheduler
            return step.token_id

        token = asyncio.run(first_token_then_cancel(base))
        assert pool.num_in_use == 0
        (slot,) = list(pool._cached)  # cancelled between steps: its whole state is cached
        consumed = pool.cached_tokens(slot)
        assert consumed[: len(base)] == tuple(base) and consumed[len(base)] == token

        # a forward that fails on a hit frees the slot (its state may be half written)
        forward = engine.model.forward

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        engine.model.forward = broken

        async def fails(prompt):
            with pytest.raises(RuntimeError, match="boom"):
                [t async for t in engine.generate(prompt, GREEDY)]

        asyncio.run(fails([*list(consumed), 3, 4]))
        engine.model.forward = forward
        assert pool.num_in_use == 0 and pool.num_cached == 0 and pool.stats.hits == 1

        # a sampling error (a mask that allows nothing) fails the row and frees its slot
        none = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                              logits_mask=torch.zeros(engine.model.config.vocab_size,
                                                      dtype=torch.bool))

        async def unsampleable(prompt):
            with pytest.raises(ValueError):
                [t async for t in engine.generate(prompt, none)]

        asyncio.run(unsampleable(base))
        assert pool.num_in_use == 0 and pool.num_cached == 0
    finally:
        engine.close()


# -- the real renderer: a follow-up agent prompt starts with what the engine cached ----------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def _assistant_text(reasoning: str, city: str) -> str:
    """What the model generates for a tool call: reasoning, </think>, the DSML block, EOS."""
    return (f"{reasoning}</think>\n\n<｜DSML｜tool_calls>\n"
            f'<｜DSML｜invoke name="get_weather">\n'
            f'<｜DSML｜parameter name="city" string="true">{city}</｜DSML｜parameter>\n'
            f"</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")


def test_the_rendered_follow_up_of_a_tool_turn_starts_with_the_cached_ids():
    tok = load_tokenizer()
    messages = [{"role": "system", "content": "You are an agent."},
                {"role": "user", "content": "Weather in Paris, then Rome?"}]
    prompt_ids = tok.encode_prompt(render_chat({"model": "x", "messages": messages,
                                                "tools": TOOLS}))
    for turn, city in enumerate(("Paris", "Rome")):
        reasoning = f"I need the weather of {city}."
        generated = tok.encode_generated(_assistant_text(reasoning, city))
        assert generated[-1] == 1  # EOS: sampled, never fed; the engine caches ids[:-1]
        cached = prompt_ids + generated[:-1]
        messages = [*messages, {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": [{"id": f"c{turn}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}, {"role": "tool", "tool_call_id": f"c{turn}", "content": "sunny, 20C"}]
        follow = tok.encode_prompt(render_chat({"model": "x", "messages": messages,
                                                "tools": TOOLS}))
        assert follow[: len(cached)] == cached and len(follow) > len(cached)
        assert follow[len(cached)] == 1  # the reuse prefills from the EOS on
        prompt_ids = follow


def test_without_tools_the_reasoning_is_dropped_so_the_follow_up_diverges():
    """dsml.md 3.12: without tools an earlier turn's reasoning is not rendered again, so
    the follow-up prompt diverges inside the cached ids: a miss (exact, not reusable)."""
    tok = load_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    prompt_ids = tok.encode_prompt(render_chat({"model": "x", "messages": messages}))
    generated = tok.encode_generated("Greet back.</think>Hello!<｜end▁of▁sentence｜>")
    follow = tok.encode_prompt(render_chat({"model": "x", "messages": [*messages, {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."}, {"role": "user", "content": "bye"}]}))
    cached = prompt_ids + generated[:-1]
    assert follow[: len(cached)] != cached


def test_the_start_up_prefill_leaves_the_pool_as_it_was(monkeypatch):
    """Engine.warm_prefill (run at start on CUDA): one chunk through a slot that is freed,
    not cached, and nothing counted as a request."""
    monkeypatch.setattr(runtime, "PREFILL_CHUNK", 20)
    model = tiny_model(seed=0)
    engine = Engine(model, load_tokenizer(), DEVICE, max_seq_len=64, max_batch_size=2,
                    engine_path="fast", capture_graphs=False)
    try:
        engine.warm_prefill()
        pool = engine._pool
        assert pool.num_in_use == 0 and pool.num_cached == 0 and pool.num_free == 2
        assert engine.stats()["requests"] == 0 and engine.stats()["prefill_tokens"] == 0
    finally:
        engine.close()
