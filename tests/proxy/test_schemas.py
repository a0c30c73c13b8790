"""Wire models: lenient where SDKs evolve, strict where the answer would be wrong."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas import export
from schemas.openai_chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest


def test_json_schema_files_are_up_to_date() -> None:
    for name, text in export.render_schemas().items():
        path = export.JSON_DIR / name
        assert path.exists(), f"missing {path}: run python -m schemas.export"
        assert path.read_text(encoding="utf-8") == text, f"{name} is stale: python -m schemas.export"


def test_export_check_passes_and_covers_every_file() -> None:
    assert export.main(["--check"]) == 0
    on_disk = {p.name for p in export.JSON_DIR.glob("*.json")}
    assert on_disk == set(export.render_schemas()), "a file in schemas/json/ is not exported"


# Users import these files by name: a rename breaks them.
PUBLISHED = {
    "anthropic_messages_request.json": "MessagesRequest",
    "anthropic_count_tokens_request.json": "CountTokensRequest",
    "anthropic_message.json": "Message",
    "anthropic_error.json": "ErrorBody",
    "responses_request.json": "ResponsesRequest",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_anthropic_and_responses_models_are_exported(name: str) -> None:
    schema = json.loads((export.JSON_DIR / name).read_text(encoding="utf-8"))
    assert schema["title"] == PUBLISHED[name]
    Draft202012Validator.check_schema(schema)


def _file_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((export.JSON_DIR / name).read_text(encoding="utf-8")))


def test_exported_request_schemas_accept_real_requests_and_reject_bad_ones() -> None:
    messages = {
        "model": "deepseek-v4-flash",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 512},
        "stream": True,
    }
    validator = _file_validator("anthropic_messages_request.json")
    assert validator.is_valid(messages)
    assert not validator.is_valid({k: v for k, v in messages.items() if k != "max_tokens"})
    count = {k: v for k, v in messages.items() if k not in ("max_tokens", "stream")}
    assert _file_validator("anthropic_count_tokens_request.json").is_valid(count)
    validator = _file_validator("responses_request.json")
    assert validator.is_valid({"model": "m", "input": "hi", "max_output_tokens": 10})
    assert not validator.is_valid({"model": "m", "input": "hi", "max_output_tokens": 0})
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 2,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }  # fmt: skip
    assert _file_validator("anthropic_message.json").is_valid(message)


def test_request_accepts_every_api_md_field_and_ignores_unknown_ones() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "deepseek-reasoner",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": None, "reasoning": "r", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
            {"role": "assistant", "content": "pre", "prefix": True},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {},
                                                    "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 10, "max_completion_tokens": 20, "stop": ["a", "b"],
        "temperature": 0.5, "top_p": 0.5, "seed": 1, "n": 1, "reasoning_effort": "max",
        "thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": True},
        "a_field_from_2027": {"anything": True},
    })
    dumped = req.model_dump(exclude_none=True, by_alias=True)
    assert "a_field_from_2027" not in dumped
    assert dumped["response_format"]["json_schema"]["schema"] == {}
    assert dumped["messages"][2]["reasoning"] == "r"
    assert dumped["messages"][4]["prefix"] is True
    assert req.stop_list() == ["a", "b"]


@pytest.mark.parametrize("patch", [{"n": 2}, {"stop": ["1", "2", "3", "4", "5"]},
                                   {"temperature": 3}, {"messages": []},
                                   {"messages": [{"role": "robot", "content": "x"}]}])
def test_request_rejects(patch: dict) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **patch}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_response_models_validate_what_the_encoder_writes() -> None:
    ChatCompletion.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": None, "reasoning_content": "r", "reasoning": "r",
            "tool_calls": [{"id": "call_x", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                  "completion_tokens_details": {"reasoning_tokens": 1}}})
    ChatCompletionChunk.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "{\"a"}}]}, "finish_reason": None}],
        "usage": None})
