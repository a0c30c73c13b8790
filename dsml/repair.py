"""Last-resort repair of a completed DSML block with lxml's recovering XML parser.

The state machine in `dsml.parser` reads every spelling dsml.md section 6 tolerates. When a
completed block (or an invoke body) still cannot be read, its DSML tag names are rewritten
to plain XML (`<｜DSML｜invoke` -> `<invoke`, `</｜DSML｜ calls>` -> `</tool_calls>`,
typographic quotes -> `"`) and handed to `lxml.etree.XMLParser(recover=True)`, which is
built to make sense of broken markup (unclosed tags, stray text). The parser counts every
call recovered this way as `RepairKind.LXML_REPAIR`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_TAG = re.compile(
    r"<(/?)(?:｜｜|｜|\|\||\||‖| \| |)DSML(?:｜｜|｜|\|\||\||‖| \| ) ?"
    r"(tool_calls|toolcalls|tool-calls|function_calls|calls|tool_use|tool_call|invoke|parameter)\b"
)
_CANON = {"invoke": "invoke", "parameter": "parameter"}


@dataclass(slots=True)
class RepairedInvoke:
    name: str | None
    params: list[tuple[str, str | None, str]] = field(
        default_factory=list
    )  # (key, string attr, text)
    body: str = ""  # text directly inside the invoke (a JSON body, if any)


def normalise(text: str) -> str:
    """DSML tags -> plain XML tag names; typographic quotes -> straight quotes."""
    text = _TAG.sub(lambda m: f"<{m.group(1)}{_CANON.get(m.group(2), 'tool_calls')}", text)
    return text.replace("“", '"').replace("”", '"')


def _parse(text: str) -> Any:
    """The root element lxml recovers from `text` (wrapped), or None."""
    from lxml import etree  # imported on first repair: most turns never need it

    # No entity expansion, no network: the input is model output.
    parser = etree.XMLParser(recover=True, resolve_entities=False, no_network=True, huge_tree=False)
    try:
        data = f"<root>{normalise(text)}</root>".encode()
    except UnicodeEncodeError:  # a lone surrogate: nothing lxml could read back verbatim
        return None
    try:
        return etree.fromstring(data, parser)
    except (etree.XMLSyntaxError, ValueError):
        return None


_INVOKE_TAG = re.compile(
    r"<(/?)(?:(?:｜｜|｜|\|\||\||‖| \| |)DSML(?:｜｜|｜|\|\||\||‖| \| ) ?)?invoke\b[^<>]*>?"
)


_WHOLE_TAG = re.compile(  # well-formed tags only
    r"""</?[\w-]+(?:\s+[\w-]+\s*=\s*(?:"[^"]*"|'[^']*'))*\s*/?>"""
)


def keeps_text(text: str, values: list[str]) -> bool:
    """lxml's reading of `text` kept every character outside whole tags (whitespace
    aside) in `values`: a repair never drops text (dsml.md 6.1; a broken tag swallows the
    text after it in lxml)."""
    import html

    outside = "".join(html.unescape(_WHOLE_TAG.sub("", normalise(text))).split())
    return outside == "".join("".join(values).split())


def has_markup(text: str) -> bool:
    """`text` holds a DSML tag (any spelling)."""
    return _TAG.search(text) is not None


def split_invokes(text: str) -> list[tuple[int, int, bool]]:
    """`text` cut at whole invoke tags: (start, end, is an invoke) pieces covering it. An
    invoke runs from its opener to its closer, or to the next opener or the end; what is
    between invokes is kept as its own piece (prose beside a call is not lost)."""
    out: list[tuple[int, int, bool]] = []
    tags = list(_INVOKE_TAG.finditer(text))
    pos = 0
    i = 0
    while i < len(tags):
        m = tags[i]
        i += 1
        if m.group(1) or m.start() < pos:  # a closer outside an invoke stays in its piece
            continue
        if m.start() > pos:
            out.append((pos, m.start(), False))
        end = len(text)
        while i < len(tags):
            nxt = tags[i]
            if not nxt.group(1):
                end = nxt.start()
                break
            i += 1
            end = nxt.end()
            break
        out.append((m.start(), end, True))
        pos = end
    if pos < len(text):
        out.append((pos, len(text), False))
    return out


def read_invokes(text: str) -> list[RepairedInvoke]:
    """Every `invoke` element lxml can recover from `text` (DSML or plain tag names)."""
    root = _parse(text)
    if root is None:
        return []
    out = []
    for inv in root.iter("invoke"):
        item = RepairedInvoke(inv.get("name"), body=(inv.text or "").strip())
        for p in inv.iter("parameter"):
            key = p.get("name")
            if key is not None:
                item.params.append((key, p.get("string"), "".join(p.itertext())))
        out.append(item)
    return out


def read_parameters(text: str) -> list[tuple[str, str | None, str]] | None:
    """Parameters recovered from an invoke body the state machine could not read, or None."""
    root = _parse(text)
    if root is None:
        return None
    params = [
        (p.get("name"), p.get("string"), "".join(p.itertext())) for p in root.iter("parameter")
    ]
    params = [p for p in params if p[0] is not None]
    return params or None  # type: ignore[return-value]


__all__ = ["RepairedInvoke", "has_markup", "normalise", "read_invokes", "read_parameters", "split_invokes"]
