"""The tokenizer's piece cache: the same ids as uncached encoding, bounded, not corruptible."""

from __future__ import annotations

import json
import threading
from array import array
from pathlib import Path

import pytest

from dsml import Dialect, render_chat
from dsml.prompt import Prompt, Segment
from dsml.tokenizer import V4Tokenizer, _PieceCache, load_tokenizer

DATA = Path(__file__).parent.parent / "data" / "dsml"


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return load_tokenizer()


def uncached(tok: V4Tokenizer, prompt: Prompt) -> list[int]:
    """encode_prompt with a cache that never holds anything."""
    fresh = V4Tokenizer.__new__(V4Tokenizer)
    fresh.__dict__.update(tok.__dict__)
    fresh._pieces = _PieceCache(max_chars=0)
    ids = fresh.encode_prompt(prompt)
    assert len(fresh._pieces) == 0
    return ids


def prompts() -> list[Prompt]:
    out = []
    for path in [DATA / "render.jsonl", DATA / "dialects" / "v4-0731" / "render.jsonl"]:
        for line in path.read_text(encoding="utf-8").splitlines()[:300]:
            case = json.loads(line)
            out.append(render_chat(case["request"], dialect=Dialect(case.get("dialect", "v4"))))
    return out


def test_cached_ids_equal_uncached_ids(tok: V4Tokenizer) -> None:
    cache_before = tok._pieces
    tok._pieces = _PieceCache(max_chars=10_000_000)
    try:
        cases = prompts()
        expected = [uncached(tok, p) for p in cases]
        first = [tok.encode_prompt(p) for p in cases]  # fills the cache
        assert len(tok._pieces) > 0
        second = [tok.encode_prompt(p) for p in cases]  # from the cache
        assert first == expected and second == expected
        # In a changed order, and after eviction has been at work (a tiny cache).
        tok._pieces = _PieceCache(max_chars=3_000, max_entries=20)
        for p, ids in reversed(list(zip(cases, expected, strict=True))):
            assert tok.encode_prompt(p) == ids
    finally:
        tok._pieces = cache_before


def test_callers_cannot_corrupt_the_cache(tok: V4Tokenizer) -> None:
    prompt = Prompt([Segment("<｜begin▁of▁sentence｜>", True), Segment("You call tools. " * 30),
                     Segment("<｜User｜>", True), Segment("hello"),
                     Segment("<｜Assistant｜></think>", True)])
    expected = uncached(tok, prompt)
    ids = tok.encode_prompt(prompt)
    ids[1] = 999  # the caller owns its list
    ids.append(5)
    ids.clear()
    again = tok.encode_prompt(prompt)
    assert again == expected
    assert tok.encode_prompt(prompt) is not again  # a new list every call
    assert type(again) is list


def test_bounded_by_entries_and_characters() -> None:
    cache = _PieceCache(max_chars=1_000, max_entries=3)
    for k in range(10):
        cache.put(f"piece {k}", array("I", [k]))
    assert len(cache) == 3
    assert cache.get("piece 0") is None and cache.get("piece 9") is not None
    cache.get("piece 7")  # used: kept over piece 8
    cache.put("piece 10", array("I", [10]))
    assert cache.get("piece 7") is not None and cache.get("piece 8") is None

    cache = _PieceCache(max_chars=100, max_entries=1_000)
    for k in range(50):
        cache.put(f"{k:03d}" + "x" * 17, array("I", [k]))  # 20 characters each
    assert len(cache) == 5 and cache.num_chars == 100
    cache.put("y" * 101, array("I", [1]))  # over the whole budget: not kept
    assert cache.get("y" * 101) is None and len(cache) == 5


def test_tokenizer_cache_stays_bounded(tok: V4Tokenizer) -> None:
    cache_before = tok._pieces
    tok._pieces = _PieceCache(max_chars=5_000, max_entries=50)
    try:
        for k in range(400):
            tok.encode_prompt(Prompt([Segment("<｜User｜>", True), Segment(f"question {k} " * 5)]))
        assert len(tok._pieces) <= 50 and tok._pieces.num_chars <= 5_000
    finally:
        tok._pieces = cache_before


def test_threads_share_the_cache(tok: V4Tokenizer) -> None:
    texts = [f"tool schema number {k}: " + "{\"type\": \"object\"} " * (k % 7 + 1) for k in range(60)]
    expected = {t: tok.encode_text(t) for t in texts}
    cache_before = tok._pieces
    tok._pieces = _PieceCache(max_chars=2_000, max_entries=25)  # evicting all the time
    errors = []

    def work(offset: int) -> None:
        for k in range(300):
            text = texts[(k * 7 + offset) % len(texts)]
            ids = tok.encode_prompt(Prompt([Segment("<｜User｜>", True), Segment(text)]))
            if ids[1:] != expected[text]:
                errors.append(text)

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tok._pieces = cache_before
    assert not errors


# The other per-request saving beside the cache: dsml.request copies every tool's schema with
# a JSON copy instead of copy.deepcopy. The prompt must still own its tools.
def test_rendered_tools_do_not_alias_the_request() -> None:
    from collections import OrderedDict

    schema = {"type": "object", "properties": {"path": {"type": "string", "enum": ["a", "b"]},
                                               "n": {"type": "integer", "default": 1.5},
                                               "flag": {"type": ["boolean", "null"]}},
              "required": ["path"], "x-extra": OrderedDict(k=(1, 2))}
    request = {"messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    before = render_chat(request)
    params = before.tools[0]["function"]["parameters"]
    assert params == schema and params is not schema
    assert params["properties"]["path"]["enum"] is not schema["properties"]["path"]["enum"]
    schema["properties"]["path"]["enum"].append("c")  # the client's object changes later
    schema["required"].clear()
    assert params["properties"]["path"]["enum"] == ["a", "b"] and params["required"] == ["path"]
    params["properties"].clear()  # and the prompt's changes do not reach the client's object
    assert "n" in schema["properties"]
    assert render_chat(request).text != before.text  # rendered from the changed request
