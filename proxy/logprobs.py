"""Logprobs on the wire: which tokens get them, and their JSON in each API's shape.

The backend gives one `TokenLogprob` per generated token; the client sees only part of what
was generated. The rule (README, "Sampling fields"): **only the tokens of visible content
carry logprobs** — a chat message's `content`, a Responses `output_text`. Reasoning tokens,
DSML markup and tool-call arguments, EOS and text the server injects (a forced tool opener,
an appended `</think>`) have none: OpenAI's own `logprobs.content` covers the content only,
and a tool call's arguments are re-encoded JSON, not the model's tokens.

How tokens are matched to content (`LogprobAligner`): the turn feeds the parser one token
at a time when logprobs are asked for; a token whose text produced content carries its
logprob into that content event, together with any tokens the parser was holding back (a
possible tag prefix such as `<` that turned out to be text). Held-back tokens that turn out
to be markup or reasoning are dropped. So the logprobs of a content event are those of the
tokens its text came from; the text of the tokens and the content can differ where the
parser removes text (the blank line before a tool block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsml.events import ContentDelta, Event, ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from proxy.backends.base import TokenLogprob


@dataclass(frozen=True, slots=True)
class ContentWithLogprobs(ContentDelta):
    """A ContentDelta with the logprobs of the tokens its text came from (encoders that
    know nothing of logprobs see a plain ContentDelta)."""

    logprobs: tuple[TokenLogprob, ...] = ()


_NOT_CONTENT = (ReasoningDelta, ToolCallStart, ToolCallArgsDelta)


class LogprobAligner:
    """Attaches the logprobs of fed tokens to the content events they produced."""

    def __init__(self) -> None:
        self._held: list[TokenLogprob] = []
        self.content: list[TokenLogprob] = []  # every attached entry, in order (non-streamed)

    def attach(self, entries: list[TokenLogprob] | None, events: list[Event]) -> list[Event]:
        """`events`, the parser's output after feeding the tokens of `entries` (None: text
        that is not the model's), with the first content event carrying the logprobs."""
        if entries:
            self._held.extend(entries)
        for k, event in enumerate(events):
            if isinstance(event, ContentDelta) and event.text:
                held, self._held = tuple(self._held), []
                self.content.extend(held)
                events[k] = ContentWithLogprobs(event.text, held)
                return events
        if any(isinstance(event, _NOT_CONTENT) for event in events):
            self._held.clear()  # they were reasoning, markup or arguments
        return events


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def openai_entry(entry: TokenLogprob) -> dict[str, Any]:
    """Chat Completions `logprobs.content[]` and Responses `logprobs[]` share this shape."""
    return {"token": entry.token, "logprob": entry.logprob, "bytes": _bytes(entry.token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": _bytes(t)}
                             for t, lp in entry.top]}


def openai_entries(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[dict[str, Any]]:
    return [openai_entry(e) for e in entries]


def legacy_logprobs(entries: list[TokenLogprob], text_offset: int, top: int) -> dict[str, Any]:
    """The legacy Completions form; `text_offset` is where the first token starts."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top[:top]) for e in entries],
            "text_offset": offsets}
