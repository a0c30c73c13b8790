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
    r"<(/?)(?:｜｜|｜|\|\||\||)DSML(?:｜｜|｜|\|\||\|) ?"
    r"(tool_calls|toolcalls|tool-calls|function_calls|calls|invoke|parameter)\b"
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
        return etree.fromstring(f"<root>{normalise(text)}</root>".encode(), parser)
    except etree.XMLSyntaxError:
        return None


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


__all__ = ["RepairedInvoke", "normalise", "read_invokes", "read_parameters"]
