"""The caches on the rendering path (dsml.request.TOOLS_CACHE: checked tools by request
content; dsml.render_common.TOOLS_SECTIONS: rendered tools sections by content): a cached render is
the uncached one, byte for byte and segment for segment; nothing a caller does to its dicts,
before or after, reaches what is cached; both caches stay bounded."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import dsml.render_common as render_mod
import dsml.request as request_mod
from dsml import Dialect, Prompt, render_chat, render_messages
from dsml.lru import SizedLRU
from tests.dsml.test_render_vectors import VECTOR_FILES

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def vectors() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for dialect, path in VECTOR_FILES.items():
        for line in path.read_text(encoding="utf-8").splitlines():
            out.append((dialect, json.loads(line)))
    return out


VECTORS = vectors()
WITH_TOOLS = [(d, v) for d, v in VECTORS if v["request"].get("tools")]


@pytest.fixture
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Empty caches of the default sizes for the test, the process-wide ones put back."""
    monkeypatch.setattr(request_mod, "TOOLS_CACHE", SizedLRU(request_mod.TOOLS_CACHE_MAX_ENTRIES, request_mod.TOOLS_CACHE_MAX_BYTES))
    monkeypatch.setattr(render_mod, "TOOLS_SECTIONS", SizedLRU(render_mod.TOOLS_CACHE_MAX_ENTRIES, render_mod.TOOLS_CACHE_MAX_CHARS))
    yield


def uncached(fn: Any, *args: Any, **kwargs: Any) -> Prompt:
    """`fn(*args)` with both caches holding nothing (and never filled)."""
    saved = request_mod.TOOLS_CACHE, render_mod.TOOLS_SECTIONS
    request_mod.TOOLS_CACHE = SizedLRU(0, request_mod.TOOLS_CACHE_MAX_BYTES)
    render_mod.TOOLS_SECTIONS = SizedLRU(0, render_mod.TOOLS_CACHE_MAX_CHARS)
    try:
        return fn(*args, **kwargs)
    finally:
        request_mod.TOOLS_CACHE, render_mod.TOOLS_SECTIONS = saved


def fields(prompt: Prompt) -> tuple[Any, ...]:
    return ([(s.text, s.control) for s in prompt.segments], prompt.thinking, prompt.tools,
            prompt.tool_choice, prompt.prefix)


def test_there_are_vectors_with_tools() -> None:
    assert len(WITH_TOOLS) > 100
    assert {d for d, _ in WITH_TOOLS} == set(VECTOR_FILES)


@pytest.mark.usefixtures("fresh_caches")
def test_cached_renders_equal_uncached_renders_on_every_vector() -> None:
    expected = [fields(uncached(render_chat, copy.deepcopy(v["request"]), dialect=Dialect(d)))
                for d, v in VECTORS]
    assert len(request_mod.TOOLS_CACHE) == 0 and len(render_mod.TOOLS_SECTIONS) == 0
    for _ in range(2):  # filling the caches, then from them
        got = [fields(render_chat(copy.deepcopy(v["request"]), dialect=Dialect(d)))
               for d, v in VECTORS]
        assert got == expected
    assert len(request_mod.TOOLS_CACHE) > 50 and len(render_mod.TOOLS_SECTIONS) > 50
    for (_, vector), (segments, *_) in zip(VECTORS, expected, strict=True):
        assert "".join(text for text, _ in segments) == vector["prompt"]  # the golden text


@pytest.mark.usefixtures("fresh_caches")
def test_other_tool_choices_and_models_share_nothing_wrongly() -> None:
    base = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": WEATHER}
    variants = [
        {**base, "tool_choice": choice} for choice in
        ("auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}})
    ] + [{**base, "model": "deepseek-chat"}, {**base, "reasoning_effort": "max"}]
    for dialect in Dialect:
        expected = [fields(uncached(render_chat, copy.deepcopy(r), dialect=dialect))
                    for r in variants]
        for _ in range(2):
            assert [fields(render_chat(copy.deepcopy(r), dialect=dialect))
                    for r in variants] == expected


@pytest.mark.usefixtures("fresh_caches")
def test_render_messages_with_tools_cached_and_not() -> None:
    """The lower-level API (DeepSeek's message format) shares the sections cache."""
    messages = [{"role": "system", "content": "Be brief.", "tools": copy.deepcopy(WEATHER)},
                {"role": "user", "content": "Weather in Paris?"}]
    for dialect in Dialect:
        for mode in ("thinking", "chat"):
            expected = fields(uncached(render_messages, copy.deepcopy(messages), mode, dialect))
            assert fields(render_messages(copy.deepcopy(messages), mode, dialect)) == expected
            assert fields(render_messages(copy.deepcopy(messages), mode, dialect)) == expected


@pytest.mark.usefixtures("fresh_caches")
def test_mutating_the_callers_tools_after_a_render_changes_no_later_render() -> None:
    request = {"messages": [{"role": "user", "content": "Weather?"}],
               "tools": copy.deepcopy(WEATHER)}
    first = fields(render_chat(request))
    # The caller changes every level of its own tool dicts after the render...
    function = request["tools"][0]["function"]
    function["description"] = "CHANGED"
    function["parameters"]["properties"]["city"]["type"] = "integer"
    function["parameters"]["required"].append("country")
    request["tools"].append(copy.deepcopy(request["tools"][0]))
    # ...a request with the original tools still renders as before (from the cache)...
    original = {"messages": [{"role": "user", "content": "Weather?"}],
                "tools": copy.deepcopy(WEATHER)}
    assert fields(render_chat(original)) == first
    # ...and the changed request renders the changed tools, not a stale entry.
    changed = fields(render_chat(request))
    assert changed != first
    assert changed == fields(uncached(render_chat, copy.deepcopy(request)))
    assert "CHANGED" in "".join(text for text, _ in changed[0])


@pytest.mark.usefixtures("fresh_caches")
def test_mutating_a_prompts_tools_changes_no_later_render() -> None:
    """Prompt.tools goes to the parser and schema module: each render gets its own copy."""
    request = {"messages": [{"role": "user", "content": "Weather?"}], "tools": WEATHER}
    first = render_chat(copy.deepcopy(request))
    expected = copy.deepcopy(fields(first))
    first.tools[0]["function"]["parameters"]["properties"].clear()
    first.tools[0]["function"]["name"] = "other"
    first.tools.append({"type": "function", "function": {"name": "x"}})
    second = render_chat(copy.deepcopy(request))
    assert fields(second) == expected
    assert second.tools[0]["function"] is not first.tools[0]["function"]


@pytest.mark.usefixtures("fresh_caches")
def test_equal_looking_values_of_other_types_are_not_confused() -> None:
    """1, 1.0 and True print differently in the schema JSON: three entries, three texts."""
    texts = []
    for value in (1, 1.0, True):
        tools = copy.deepcopy(WEATHER)
        tools[0]["function"]["parameters"]["properties"]["city"]["default"] = value
        request = {"messages": [{"role": "user", "content": "Weather?"}], "tools": tools}
        prompt = render_chat(request)
        assert fields(prompt) == fields(uncached(render_chat, copy.deepcopy(request)))
        texts.append(prompt.text)
    assert len(set(texts)) == 3
    assert len(render_mod.TOOLS_SECTIONS) == 3 and len(request_mod.TOOLS_CACHE) == 3


class _Tools(list):  # type: ignore[type-arg]
    """A list subclass: not plain data for marshal, so rendered without the caches."""


@pytest.mark.usefixtures("fresh_caches")
def test_tools_that_are_not_plain_data_render_uncached() -> None:
    request = {"messages": [{"role": "user", "content": "Weather?"}],
               "tools": _Tools(copy.deepcopy(WEATHER))}
    plain = {"messages": [{"role": "user", "content": "Weather?"}], "tools": WEATHER}
    assert fields(render_chat(request)) == fields(uncached(render_chat, copy.deepcopy(plain)))
    assert len(request_mod.TOOLS_CACHE) == 0
    messages = [{"role": "system", "content": "", "tools": _Tools(copy.deepcopy(WEATHER))},
                {"role": "user", "content": "Weather?"}]
    render_messages(messages)
    assert len(render_mod.TOOLS_SECTIONS) == 1  # the plain request's entry only


@pytest.mark.usefixtures("fresh_caches")
def test_errors_are_not_cached() -> None:
    bad = {"messages": [{"role": "user", "content": "x"}],
           "tools": [{"type": "function", "function": {"name": "bad name!"}}]}
    for _ in range(2):
        with pytest.raises(request_mod.RenderError, match="tool names"):
            render_chat(copy.deepcopy(bad))
    assert len(request_mod.TOOLS_CACHE) == 0 and len(render_mod.TOOLS_SECTIONS) == 0


def many_tools(k: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"tool_{k}", "description": "d" * 50,
                                              "parameters": {"type": "object"}}}]


def test_the_caches_are_bounded_by_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_mod, "TOOLS_CACHE", SizedLRU(8, request_mod.TOOLS_CACHE_MAX_BYTES))
    monkeypatch.setattr(render_mod, "TOOLS_SECTIONS", SizedLRU(5, render_mod.TOOLS_CACHE_MAX_CHARS))
    for k in range(40):
        render_chat({"messages": [{"role": "user", "content": "x"}], "tools": many_tools(k)})
        assert len(request_mod.TOOLS_CACHE) <= 8 and len(render_mod.TOOLS_SECTIONS) <= 5
    assert len(request_mod.TOOLS_CACHE) == 8 and len(render_mod.TOOLS_SECTIONS) == 5
    # Least recently used goes first: tools 39..35 are the sections kept; using 35 keeps it.
    render_chat({"messages": [{"role": "user", "content": "x"}], "tools": many_tools(35)})
    render_chat({"messages": [{"role": "user", "content": "x"}], "tools": many_tools(40)})
    kept = render_mod.TOOLS_SECTIONS.oldest_first()
    assert len(kept) == 5 and any(b"tool_35" in key[2] for key in kept)
    assert not any(b"tool_36" in key[2] for key in kept)


def test_the_caches_are_bounded_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    tools_cache = SizedLRU(1_000, 5_000)
    sections = SizedLRU(1_000, 8_000)
    monkeypatch.setattr(request_mod, "TOOLS_CACHE", tools_cache)
    monkeypatch.setattr(render_mod, "TOOLS_SECTIONS", sections)
    for k in range(60):
        render_chat({"messages": [{"role": "user", "content": "x"}], "tools": many_tools(k)})
        assert tools_cache.size <= 5_000 and sections.size <= 8_000
    assert 0 < len(tools_cache) < 60 and 0 < len(sections) < 60
    # One entry over the whole budget is rendered and not kept.
    huge = [{"type": "function", "function": {"name": "huge", "description": "x" * 9_000}}]
    prompt = render_chat({"messages": [{"role": "user", "content": "x"}], "tools": huge})
    assert "x" * 9_000 in prompt.text
    assert not any(b"huge" in key for key in tools_cache.oldest_first())
    assert not any(b"huge" in key[2] for key in sections.oldest_first())


@pytest.mark.usefixtures("fresh_caches")
def test_threads_render_through_the_caches() -> None:
    requests = [({"messages": [{"role": "user", "content": f"q{k}"}], "tools": many_tools(k % 7)})
                for k in range(21)]
    expected = [fields(uncached(render_chat, copy.deepcopy(r))) for r in requests]
    errors: list[int] = []

    def work(offset: int) -> None:
        for n in range(200):
            k = (n * 5 + offset) % len(requests)
            if fields(render_chat(copy.deepcopy(requests[k]))) != expected[k]:
                errors.append(k)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
