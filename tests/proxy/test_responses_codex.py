"""A tool loop shaped like Codex's own traffic, read raw off the wire.

Codex posts to `{base_url}/responses` with `store: false`, `stream: true`, `include:
["reasoning.encrypted_content"]`, a `shell` function tool, `parallel_tool_calls: false`, and
replays the previous turn's items itself: reasoning (encrypted_content only), function_call,
function_call_output.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import StartProxy

EOS = "<｜end▁of▁sentence｜>"
SHELL = {"type": "function", "name": "shell", "description": "Runs a shell command", "strict": False,
         "parameters": {"type": "object", "properties": {
             "command": {"type": "array", "items": {"type": "string"}},
             "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}},
             "required": ["command"], "additionalProperties": False}}
CALL = ("I should list the files.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"shell\">\n"
        "<｜DSML｜parameter name=\"command\" string=\"false\">[\"ls\"]</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)


def body(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": "deepseek-v4", "instructions": "You are Codex.", "input": items,
            "tools": [SHELL], "tool_choice": "auto", "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"}, "store": False,
            "stream": True, "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "0b9c1a52", "text": {"verbosity": "medium"}}


def done_items(raw: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What Codex keeps: every `response.output_item.done` item, and the final response."""
    events = [json.loads(d) for d in re.findall(r"^data: (.*)$", raw, flags=re.M)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    return items, events[-1]


async def test_codex_tool_loop(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(api_keys="sk-local")
    url = proxy.url + "/v1/responses"
    user = {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "<environment_context>cwd: /tmp</environment_context>"},
        {"type": "input_text", "text": "list the files"}]}
    fake.push(CALL, "Done.</think>Two files: a and b." + EOS)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-local"}) as s:
        async with s.post(url, json=body([user])) as r:
            assert r.status == 200, await r.text()
            items, last = done_items(await r.text())
        assert last["type"] == "response.completed"
        reasoning, call = items
        assert call["type"] == "function_call" and json.loads(call["arguments"]) == {
            "command": ["ls"]}
        # Codex replays reasoning without its clear text (content is not serialized back).
        replay = [{k: reasoning[k] for k in ("type", "id", "summary", "encrypted_content")},
                  {k: call[k] for k in ("type", "id", "name", "arguments", "call_id")},
                  {"type": "function_call_output", "call_id": call["call_id"],
                   "output": json.dumps({"output": "a\nb\n", "metadata": {"exit_code": 0}})}]
        async with s.post(url, json=body([user, *replay])) as r:
            assert r.status == 200, await r.text()
            items, last = done_items(await r.text())
    assert last["response"]["output"][-1]["content"][0]["text"] == "Two files: a and b."
    prompt = fake.prompt_text()
    assert prompt.startswith("<｜begin▁of▁sentence｜>You are Codex.")
    assert "I should list the files.</think>" in prompt
    assert '\\n", "metadata": {"exit_code": 0}}</tool_result>' in prompt
