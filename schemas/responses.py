"""OpenAI Responses: the request as Codex and the `openai` SDK send it.

Requests ignore unknown fields (`include`, `prompt_cache_key`, `service_tier`…). Input items
are a union on `type`, where a bare `{role, content}` is a message (the SDK's "easy" input
message). The response itself is built as plain dicts by `proxy.encoders.responses`; the
tests validate it with the openai SDK's own `Response` model, the real contract.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    # input_text / output_text / text carry `text`; input_image / input_file are refused.
    type: str
    text: str | None = None


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = "{}"


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(_Lenient):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ContentPart] = Field(default_factory=list)
    content: list[ContentPart] | None = None
    encrypted_content: str | None = None  # this server's signed reasoning (proxy.signature)


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class ToolDef(_Lenient):
    type: str  # only "function" is served; built-in tools (web_search…) are refused
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Lenient):
    type: Literal["function"]
    name: str


class ToolChoiceAllowed(_Lenient):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"] = "auto"
    tools: list[dict[str, Any]]


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction | ToolChoiceAllowed


class ReasoningOption(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None  # accepted; V4 has no summaries (reasoning comes in full)


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOption(_Lenient):
    format: TextFormat | None = None


LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRequest(_Lenient):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningOption | None = None
    max_output_tokens: int | None = Field(None, ge=1)  # includes reasoning tokens
    text: TextOption | None = None
    stream: bool = False
    store: bool | None = None  # None: stored, as OpenAI does
    previous_response_id: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None  # "message.output_text.logprobs" asks for logprobs
    metadata: dict[str, Any] | None = None

    def logprobs_count(self) -> int | None:
        """Top alternatives per output_text token when logprobs are asked for (the include,
        or top_logprobs alone), else None."""
        if LOGPROBS_INCLUDE in (self.include or ()) or self.top_logprobs is not None:
            return self.top_logprobs or 0
        return None
