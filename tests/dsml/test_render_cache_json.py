"""`V4Tokenizer.encode_prompt_json`: the prompt's ids and the same ids as a JSON array, built
from cached pieces and a cached prefix (everything before the first user turn). Always the
ids of `encode_prompt`, cached or not; the caches stay bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsml import Dialect, Prompt, Segment, render_chat
from dsml import markers as mk
from dsml.tokenizer import V4Tokenizer, _PieceCache, _prefix_cache, load_tokenizer

DATA = Path(__file__).parents[1] / "data" / "dsml"


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return load_tokenizer()


def prompts() -> list[Prompt]:
    out = []
    for path, dialect in [(DATA / "render.jsonl", Dialect.V4),
                          (DATA / "dialects" / "v4-0731" / "render.jsonl", Dialect.V4_0731)]:
        for line in path.read_text(encoding="utf-8").splitlines()[:300]:
            out.append(render_chat(json.loads(line)["request"], dialect=dialect))
    return out


def test_json_ids_are_encode_prompts_ids_cached_or_not(
        tok: V4Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = prompts()
    expected = [tok.encode_prompt(p) for p in cases]
    monkeypatch.setattr(tok, "_prefixes", _prefix_cache())
    monkeypatch.setattr(tok, "_pieces", _PieceCache(max_chars=10_000_000))
    for _ in range(2):  # filling the caches, then from them
        for prompt, ids in zip(cases, expected, strict=True):
            got, text = tok.encode_prompt_json(prompt)
            assert got == ids and json.loads(text) == ids and type(got) is list
    assert len(tok._prefixes) > 10
    # Nothing cached at all, and a cache evicting all the time.
    for prefixes, pieces in [(_prefix_cache(max_entries=0), _PieceCache(max_chars=0)),
                             (_prefix_cache(max_entries=3), _PieceCache(2_000, max_entries=20))]:
        monkeypatch.setattr(tok, "_prefixes", prefixes)
        monkeypatch.setattr(tok, "_pieces", pieces)
        for prompt, ids in reversed(list(zip(cases, expected, strict=True))):
            got, text = tok.encode_prompt_json(prompt)
            assert got == ids and json.loads(text) == ids


def test_client_text_that_looks_like_control_tokens(tok: V4Tokenizer) -> None:
    """The prefix key holds the segments' kinds too: a client's "<｜User｜>" is text."""
    control = Prompt([Segment(mk.BOS, True), Segment("sys"), Segment(mk.USER, True),
                      Segment("hi"), Segment(mk.ASSISTANT, True), Segment(mk.THINK_OPEN, True)])
    text = Prompt([Segment(mk.BOS, True), Segment("sys" + mk.USER), Segment(mk.USER, True),
                   Segment("hi"), Segment(mk.ASSISTANT, True), Segment(mk.THINK_OPEN, True)])
    for prompt in (control, text, control, text):
        ids, as_json = tok.encode_prompt_json(prompt)
        assert ids == tok.encode_prompt(prompt) == json.loads(as_json)
    assert tok.encode_prompt_json(control)[0] != tok.encode_prompt_json(text)[0]


def test_segments_that_encode_prompt_alone_handles(tok: V4Tokenizer) -> None:
    """A control segment holding several control strings, and one the V4 vocabulary lacks."""
    joined = Prompt([Segment(mk.BOS, True), Segment("s"), Segment(mk.USER, True),
                     Segment("q"), Segment(mk.ASSISTANT + mk.THINK_CLOSE, True)])
    ids, as_json = tok.encode_prompt_json(joined)
    assert ids == tok.encode_prompt(joined) == json.loads(as_json)
    with pytest.raises(Exception, match="System"):
        tok.encode_prompt_json(Prompt([Segment(mk.SYSTEM, True), Segment("x"),
                                       Segment(mk.USER, True)]))


def test_callers_own_what_they_get(tok: V4Tokenizer) -> None:
    prompt = render_chat({"messages": [{"role": "system", "content": "Be brief. " * 20},
                                       {"role": "user", "content": "hi"}]})
    first, _ = tok.encode_prompt_json(prompt)
    expected = list(first)
    first.clear()
    again, text = tok.encode_prompt_json(prompt)
    assert again == expected == json.loads(text)
    assert tok.encode_prompt_json(prompt)[0] is not again


def test_prefix_cache_counts_texts_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix cache is charged the prefix's texts and its JSON: a bound below one
    prefix's size keeps nothing, and what is kept is exactly that size."""
    tok = load_tokenizer()
    prompt = render_chat({"messages": [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": "Hi."}]})
    monkeypatch.setattr(tok, "_prefixes", _prefix_cache(max_chars=10))
    tok.encode_prompt_json(prompt)
    assert len(tok._prefixes) == 0
    monkeypatch.setattr(tok, "_prefixes", _prefix_cache())
    ids, _ = tok.encode_prompt_json(prompt)
    (key,) = tok._prefixes.oldest_first()
    cached_ids, items = tok._prefixes.get(key)
    assert tok._prefixes.size == sum(map(len, key[0])) + len(items)
    assert items == ",".join(map(str, cached_ids.tolist())) and cached_ids.tolist() == ids[:len(cached_ids)]


def test_piece_json_counts_against_the_piece_budget() -> None:
    from array import array

    cache = _PieceCache(max_chars=100, max_entries=1_000)
    for k in range(5):
        cache.put(f"{k:02d}" + "x" * 8, array("I", [k]))  # 10 characters each
    assert cache.num_chars == 50
    cache.put_json("00xxxxxxxx", "0" * 40)
    assert cache.num_chars == 90 and cache.get_with_json("00xxxxxxxx")[1] == "0" * 40
    cache.put("05xxxxxxxx", array("I", [5]))
    cache.put("06xxxxxxxx", array("I", [6]))  # 110 > 100: the least recent entry goes
    assert cache.num_chars <= 100 and cache.get_with_json("01xxxxxxxx") == (None, None)
    cache.put_json("gone", "1")  # no entry: nothing kept
    assert cache.get_with_json("gone") == (None, None)
