"""A tool loop shaped like Claude Code's own traffic, read raw off the wire.

Claude Code posts to `/v1/messages?beta=true` with `Authorization: Bearer` (from
ANTHROPIC_AUTH_TOKEN), beta headers, `cache_control` on system and message blocks, draft-07
tool schemas, a thinking budget, and replays thinking blocks with their signatures.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import StartProxy

EOS = "<｜end▁of▁sentence｜>"
HEADERS = {"Authorization": "Bearer sk-local", "anthropic-version": "2023-06-01",
           "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
           "x-app": "cli", "User-Agent": "claude-cli/2.0.0 (external, cli)"}
EPHEMERAL = {"type": "ephemeral"}
BASH = {"name": "Bash", "description": "Executes a given bash command.", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"},
                                     "timeout": {"type": "number"}},
    "required": ["command"], "additionalProperties": False,
    "$schema": "http://json-schema.org/draft-07/schema#"}}
CALL = ("The user wants a listing.</think>I'll list the files.\n\n<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"Bash\">\n<｜DSML｜parameter name=\"command\" string=\"true\">"
        "ls</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)


def body(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": "deepseek-v4", "max_tokens": 32000, "stream": True, "temperature": 1,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": EPHEMERAL},
                   {"type": "text", "text": "Be concise.", "cache_control": EPHEMERAL}],
        "messages": messages, "tools": [BASH],
        "metadata": {"user_id": "user_x_account__session_y"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": []},
    }


def accumulate(raw: str) -> tuple[list[dict[str, Any]], str]:
    """Content blocks and stop reason, accumulated from the raw events as a client does."""
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    stop = ""
    for name, data in re.findall(r"^event: (\S+)\ndata: (.*)$", raw, flags=re.M):
        event = json.loads(data)
        assert event["type"] == name
        if name == "content_block_start":
            assert event["index"] == len(blocks)
            blocks.append(dict(event["content_block"]))
        elif name == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
            else:
                field = {"thinking_delta": "thinking", "signature_delta": "signature",
                         "text_delta": "text"}[delta["type"]]
                block[field] = block.get(field, "") + delta[field]
        elif name == "content_block_stop" and event["index"] in partial:
            blocks[event["index"]]["input"] = json.loads(partial.pop(event["index"]))
        elif name == "message_delta":
            stop = event["delta"]["stop_reason"]
    return blocks, stop


async def test_claude_code_tool_loop(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(api_keys="sk-local")
    url = proxy.url + "/v1/messages?beta=true"
    user = {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>This is a reminder.</system-reminder>"},
        {"type": "text", "text": "list the files", "cache_control": EPHEMERAL}]}
    fake.push(CALL, "Two files.</think>There are two files: a and b." + EOS)
    async with aiohttp.ClientSession(headers=HEADERS) as s:
        async with s.post(url, json=body([user])) as r:
            assert r.status == 200, await r.text()
            blocks, stop = accumulate(await r.text())
        assert stop == "tool_use"
        assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
        assert blocks[2]["input"] == {"command": "ls"} and blocks[2]["id"].startswith("toolu_")
        result = {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": blocks[2]["id"], "content": "a\nb",
             "is_error": False},
            {"type": "text", "text": "<system-reminder>Todo list is empty.</system-reminder>"}]}
        async with s.post(url, json=body([user, {"role": "assistant", "content": blocks},
                                          result])) as r:
            assert r.status == 200, await r.text()
            final, stop = accumulate(await r.text())
    assert stop == "end_turn"
    assert final[-1] == {"type": "text", "text": "There are two files: a and b."}
    prompt = fake.prompt_text()
    assert "You are Claude Code.\n\nBe concise.\n\n## Tools" in prompt
    # The signed thinking came back and was re-rendered; budget 31999 asked for max effort.
    assert "The user wants a listing.</think>I'll list the files." in prompt
    assert "Reasoning Effort: Absolute maximum" in prompt
    assert "a\nb" in prompt and "Todo list is empty." in prompt
