"""Translation between the Anthropic / Responses wire formats and what the turn runner takes.

Every endpoint renders through `dsml.render_chat`, so each protocol's request is translated
into the OpenAI-chat-shaped dict it reads (`anthropic.py`, `responses.py`). What both share
lives here: tool-call ids across protocols. (Keep-alives are `stream_turn`'s `keepalive_s`.)
"""

from __future__ import annotations

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
