"""Translation between the Anthropic / Responses wire formats and what the turn runner takes.

Every endpoint renders through `dsml.render_chat`, so each protocol's request is translated
into the OpenAI-chat-shaped dict it reads (`anthropic.py`, `responses.py`). What both share
lives here: tool-call ids across protocols. (Keep-alives are `stream_turn`'s `keepalive_s`.)
"""

from __future__ import annotations

from typing import Any

_CALL = "call_"

# An image a tool returned (Claude Code's Read on a PNG) stays in the history for the rest of
# the session: refusing it would fail every later request, so the model reads this instead.
# An image the user sent is still a 400 (the renderer's), which the user can act on.
IMAGE_OMITTED = {"type": "text", "text": "[image omitted: this model reads text only]"}


def wire_call_id(call_id: str, prefix: str) -> str:
    """The parser's `call_…` id under a protocol's own prefix (`toolu_`): same suffix, so
    `chat_call_id` maps it back and the reasoning cache, keyed by `call_…`, still finds it."""
    return prefix + call_id[len(_CALL):] if call_id.startswith(_CALL) else call_id


def chat_call_id(wire_id: str, prefix: str) -> str:
    return _CALL + wire_id[len(prefix):] if wire_id.startswith(prefix) else wire_id


def allowed_tool_names(entries: list[Any], param: str) -> set[str]:
    """The names of `tool_choice.allowed_tools` entries, `{"type": "function", "name": ...}`
    (Responses) or `{"type": "function", "function": {"name": ...}}` (chat); anything else
    is the client's mistake, a 400 (never an AttributeError)."""
    from proxy.errors import ApiError

    names = set()
    for k, entry in enumerate(entries):
        function = entry.get("function") if isinstance(entry, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if name is None and isinstance(entry, dict):
            name = entry.get("name")
        if not isinstance(name, str):
            raise ApiError(400, f"{param}[{k}] must name a function tool "
                           '({"type": "function", "name": "..."})', param=f"{param}[{k}]",
                           code="invalid_value")
        names.add(name)
    return names
