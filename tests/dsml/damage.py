"""Generated damage for the parser's invariants (dsml.md 6.1; issue 13): well-formed tool
blocks broken the ways real engines break them, and the four checks every parse must pass.
Used by tests/dsml/test_parser_invariants.py (hypothesis) and bench/fuzz_parser.py."""

from __future__ import annotations

import json
import random
import re
from typing import Any

from dsml import markers
from dsml.events import CallOutcome, ToolCallArgsDelta, ToolCallEnd, TurnOutcome
from dsml.parser import StreamParser
from tests.dsml.conftest import counter_ids, merge

D = "｜DSML｜"


def _tool(name: str, props: dict[str, str], required: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()},
        "required": list(required)}}}  # fmt: skip


TOOLS = [
    _tool("get_weather", {"city": "string", "days": "integer"}, ("city",)),
    _tool("bash", {"command": "string"}, ("command",)),
    _tool("read_file", {"path": "string", "limit": "integer"}, ("path",)),
]
_KEYS = {"get_weather": ("city", "days"), "bash": ("command",), "read_file": ("path", "limit")}
PROSE = ["Let me check.", "Paris, for 3 days please", "x < y", "a `code` span", "ok", "\n", " "]
# A complete DSML tag in any spelling the lexer reads (no attributes checked).
DSML_TAG = re.compile(
    r"</?(?:｜｜|｜|\|\||\||‖| \| |)DSML(?:｜｜|｜|\|\||\||‖| \| ) ?"
    r"(?:tool_calls|toolcalls|tool-calls|function_calls|calls|tool_use|tool_call|invoke|parameter)"
    r"(?:\s+[\w-]+\s*=\s*[\"“”][^\"“”]*[\"“”])*\s*/?>"  # attributes as the lexer reads them
)
# A parameter opener that lost its `>` and runs into its value (dsml.lexer.glued_opener).
_GLUED_OPENER = re.compile(
    r"<(?:｜｜|｜|\|\||\||‖| \| |)DSML(?:｜｜|｜|\|\||\||‖| \| ) ?parameter"
    r"(?:\s+[\w-]+\s*=\s*[\"“”][^\"“”]*[\"“”])+(?![\s>/]|[\w-]+\s*=)"
)
# Invoke openers are value text inside a value (DeepSeek's parse vectors; dsml.lexer).
_INVOKE_OPEN = re.compile(r"<(?:｜｜|｜|\|\||\||‖| \| |)DSML(?:｜｜|｜|\|\||\||‖| \| ) ?invoke\b[^<>]*>")
# The value of generated parameter j of invoke i carries the tag `v{i}x{j}`.
_VALUE_TAG = re.compile(r"v(\d+)x\d+")


def completion(rnd: random.Random) -> tuple[list[str], bool]:
    """A damaged completion as pieces (tags and text), and whether it starts in reasoning."""
    thinking = rnd.random() < 0.4
    pieces: list[str] = []
    if thinking:
        pieces += ["I need a tool.", "</think>"] if rnd.random() < 0.7 else ["I need a tool.\n\n"]
    pieces.append(rnd.choice(PROSE))
    pieces += ["\n\n", f"<{D}tool_calls>", "\n"]
    for i in range(rnd.randint(1, 3)):
        name = rnd.choice(list(_KEYS))
        pieces += [f'<{D}invoke name="{name}">', "\n"]
        for j, key in enumerate(_KEYS[name]):
            numeric = key in ("days", "limit")
            value = str(10 * i + j) if numeric else f"v{i}x{j} {rnd.choice(PROSE)}"
            string = "false" if numeric else "true"
            pieces += [f'<{D}parameter name="{key}" string="{string}">', value,
                       f"</{D}parameter>", "\n"]  # fmt: skip
        pieces += [f"</{D}invoke>", "\n"]
    pieces += [f"</{D}tool_calls>"]
    if rnd.random() < 0.8:
        pieces.append(markers.EOS)
    for _ in range(rnd.randint(0, 3)):
        _damage(pieces, rnd)
    return pieces, thinking


def _damage(pieces: list[str], rnd: random.Random) -> None:
    if not pieces:
        return
    i = rnd.randrange(len(pieces))
    p = pieces[i]
    op = rnd.randrange(10)
    if op == 0 and p.startswith("</"):
        del pieces[i]  # a forgotten closer
    elif op == 1 and p.endswith(">"):
        pieces[i] = p[:-1]  # a tag without `>`
    elif op == 2 and p.startswith("<"):
        pieces.insert(i, p)  # a doubled tag
    elif op == 3:
        pieces.insert(i, rnd.choice(PROSE))  # prose in the wrong place
    elif op == 4 and p.startswith("<"):
        pieces.insert(i, "</")  # a stray partial closer
    elif op == 5 and D in p:
        pieces[i] = p.replace(D, rnd.choice(["｜｜DSML｜｜", "|DSML|", "DSML｜", "", " | DSML | ", "‖DSML‖"]))
        pieces[i] = pieces[i].replace("tool_calls", rnd.choice(["tool_calls", "tool_use", "toolcalls"]))
    elif op == 6:
        pieces.insert(i, rnd.choice(["</think>", "<think>", "```\n", "\n~~~\n", "`", "\ud800"]))
    elif op == 7 and 'name="' in p:
        pieces[i] = re.sub(r'name="[^"]*"', rnd.choice(['name=""', "", 'name="nope"']), p)
    elif op == 8:
        del pieces[i:]  # the stream stops
    elif op == 9 and p.startswith('<' + D + "invoke"):
        pieces.insert(i, "I will check Oslo now: ")


def parse(chunks: list[str], thinking: bool, trace: bool = False) -> tuple[StreamParser, list]:
    parser = StreamParser(TOOLS, thinking, id_factory=counter_ids(), trace=trace)
    events: list = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return parser, events


def chunked(text: str, rnd: random.Random) -> list[str]:
    cuts = sorted(rnd.sample(range(len(text) + 1), k=min(len(text) + 1, rnd.randint(0, 16))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def check(text: str, thinking: bool, rnd: random.Random) -> str | None:
    """The four invariants on one input; returns what failed, or None."""
    try:
        parser, events = parse([text], thinking, trace=True)
        _, by_chunks = parse(chunked(text, rnd), thinking)
        _, fast = parse([text], thinking)
    except Exception as exc:  # the parser never raises
        return f"raised {type(exc).__name__}: {exc}"
    r = parser.result
    # (a) no markup in argument values; none in the text of a turn that produced calls.
    for call in r.tool_calls:
        for s in _strings(call.arguments):
            if DSML_TAG.search(_INVOKE_OPEN.sub("", s)) or _GLUED_OPENER.search(s):
                return f"(a) markup in an argument value of {call.name}: {s!r}"
    # Exceptions by design: a block the stream leaves open comes back as content (dsml.md
    # section 6), and so does an orphan invoke that does not qualify as a call (6.1 rule 7),
    # so the text is checked when the block's opener and closer are intact.
    whole_block = text.count(f"<{D}tool_calls>") == 1 and f"</{D}tool_calls>" in text
    if r.tool_calls and whole_block and r.turn_outcome not in (TurnOutcome.TRUNCATED, TurnOutcome.MALFORMED):
        for region, t in (("content", r.content), ("reasoning", r.reasoning_content)):
            if DSML_TAG.search(t):
                return f"(a) markup in the {region} of a turn with calls: {t!r}"
    # (b) every character comes back: the trace covers the input, and what it names markup
    # is a tag, whitespace, or reported in a Notice.
    spans = parser.spans or []
    if "".join(t for _, t in spans) != text:
        return "(b) the trace does not cover the input"
    if "".join(t for k, t in spans if k == "content") != r.content:
        return "(b) content is not the content spans"
    if "".join(t for k, t in spans if k == "reasoning") != r.reasoning_content:
        return "(b) reasoning is not the reasoning spans"
    details = " ".join(n.detail for n in r.notices)
    for kind, t in spans:
        if kind != "markup" or not t.strip():
            continue
        rest = _MARKUP.sub("", t).strip()
        if rest and rest not in details and not any(rest in c.arguments_json for c in r.tool_calls):
            return f"(b) markup neither a tag nor reported: {t!r}"
    # (c) a parameter never moves to another call.
    for call in r.tool_calls:
        owners = {m.group(1) for s in _strings(call.arguments) for m in _VALUE_TAG.finditer(s)}
        if len(owners) > 1:
            return f"(c) values of invokes {sorted(owners)} in one call: {call.arguments}"
    # (d) chunking and the fast paths never change the result; streamed JSON == final.
    if merge(by_chunks) != merge(events) or merge(fast) != merge(events):
        return "(d) a different chunking gives different events"
    frags: dict[int, str] = {}
    for ev in events:
        if isinstance(ev, ToolCallArgsDelta):
            frags[ev.index] = frags.get(ev.index, "") + ev.fragment
        elif (isinstance(ev, ToolCallEnd) and ev.outcome != CallOutcome.TRUNCATED
              and json.loads(frags.get(ev.index, "null")) != ev.arguments):  # (cut: not JSON)
            return f"(d) streamed JSON of call {ev.index} differs from its arguments"
    return None


_MARKUP = re.compile(
    r"</?think>|<｜end▁of▁sentence｜>|\{.*\}"
    r"|</?(?:(?:｜｜|｜|\|\||\||‖| \| |)DSML(?:｜｜|｜|\|\||\||‖| \| ) ?)?[\w-]*(?:\s+[\w-]+\s*=\s*[\"“”][^\"“”]*[\"“”])*\s*/?>?",
    re.S,
)


def minimise(text: str, thinking: bool, rnd_seed: int) -> str:
    """A shorter input that still fails (greedy: drop pieces while it keeps failing)."""
    def fails(t: str) -> bool:
        return check(t, thinking, random.Random(rnd_seed)) is not None

    size = max(1, len(text) // 2)
    while size >= 1:
        i = 0
        while i < len(text):
            cand = text[:i] + text[i + size :]
            if cand and fails(cand):
                text = cand
            else:
                i += size
        size //= 2
    return text
