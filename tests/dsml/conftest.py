"""Shared fixtures of the dsml tests: the parse vectors and helpers to run the parser."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dsml.events import (
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolCallArgsDelta,
)
from dsml.parser import StreamParser

DATA = Path(__file__).parent.parent / "data" / "dsml"
PARSE_FILES = {
    "v4": DATA / "parse.jsonl",
    "wild": DATA / "wild.jsonl",
    "v4-0731": DATA / "dialects" / "v4-0731" / "parse.jsonl",
    "v4.1": DATA / "dialects" / "v4.1" / "parse.jsonl",
    "v3.2": DATA / "dialects" / "v3.2" / "parse.jsonl",
}


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def vectors(name: str) -> list[dict[str, Any]]:
    return load_jsonl(PARSE_FILES[name])


def counter_ids() -> Any:
    """A deterministic id_factory, so events of two runs compare equal."""
    counter = itertools.count()
    return lambda: f"call_{next(counter):024d}"


def parse_chunks(
    chunks: Iterable[str], tools: Any, thinking: bool, **kw: Any
) -> tuple[StreamParser, list[Event]]:
    parser = StreamParser(tools, thinking, id_factory=counter_ids(), **kw)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return parser, events


def split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def summary(parser: StreamParser) -> dict[str, Any]:
    """The shape of a vector's `expected`."""
    r = parser.result
    return {
        "reasoning_content": r.reasoning_content,
        "content": r.content,
        "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in r.tool_calls],
    }


def merge(events: list[Event]) -> list[Event]:
    """Join neighbouring text and argument deltas: what chunking may change."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, ContentDelta) and isinstance(prev, ContentDelta):
            out[-1] = ContentDelta(prev.text + ev.text)
        elif isinstance(ev, ReasoningDelta) and isinstance(prev, ReasoningDelta):
            out[-1] = ReasoningDelta(prev.text + ev.text)
        elif (isinstance(ev, ToolCallArgsDelta) and isinstance(prev, ToolCallArgsDelta)
              and prev.index == ev.index):  # fmt: skip
            out[-1] = ToolCallArgsDelta(ev.index, prev.fragment + ev.fragment)
        elif isinstance(ev, ContentDelta | ReasoningDelta) and not ev.text:
            continue
        else:
            out.append(ev)
    return out
