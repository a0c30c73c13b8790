"""A rendered prompt: ordered segments, each either renderer-inserted control text or client text.

Keeping the two apart is what makes tokenization safe (dsml.md section 4): only control
segments may become special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Segment:
    text: str
    control: bool = False


@dataclass(slots=True)
class Prompt:
    segments: list[Segment]
    thinking: bool = False  # generation starts inside reasoning (prompt ends with "<think>")
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool defs offered
    tool_choice: Any = "auto"
    prefix: str = ""  # assistant `prefix: true` continuation text, already in the prompt
    # What the answer must be, for the turn's grammar (dsml.grammar): None (free text),
    # {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"schema", "strict"}}.
    response_format: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join([s.text for s in self.segments])  # a list joins faster than a generator
