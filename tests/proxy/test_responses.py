"""POST /v1/responses with the real `openai` SDK, over the replaying fake engine.

The same recorded completions as the chat tests (parse.jsonl subset, every wild.jsonl case)
go through `responses.create` and `responses.stream`; the response the SDK accumulates from
the stream must equal the non-streaming one, and both must say what the parser says.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response

from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import ProxyServer, load_cases
from tests.proxy.test_chat_cases import PARSE_IDS, cut_call_of, reply_for

PARSE = load_cases("parse.jsonl")
WILD = load_cases("wild.jsonl")


def request_for(case: dict[str, Any]) -> dict[str, Any]:
    req: dict[str, Any] = {
        "model": "deepseek-reasoner" if case["thinking"] else "deepseek-chat",
        "input": "Go.",
    }
    if case["tools"]:
        req["tools"] = [{"type": "function", **t["function"]} for t in case["tools"]]
    return req


def view(response: Response) -> dict[str, Any]:
    return {
        "reasoning_content": "".join(c.text for item in response.output
                                     if item.type == "reasoning" for c in item.content or []),
        "content": response.output_text,
        "tool_calls": [{"name": item.name, "arguments": json.loads(item.arguments)
                        if item.status == "completed" else (item.status, item.arguments)}
                       for item in response.output if item.type == "function_call"],
    }


async def run_both(proxy: ProxyServer, fake: FakeUpstream, case: dict[str, Any]):
    client = proxy.client()
    fake.push(reply_for(case))
    plain = await client.responses.create(**request_for(case))
    fake.push(reply_for(case))
    if case.get("finish") == "length":  # the stream ends in response.incomplete
        events = [e async for e in await client.responses.create(**request_for(case), stream=True)]
        assert events[-1].type == "response.incomplete"
        return plain, events[-1].response
    async with client.responses.stream(**request_for(case)) as stream:
        streamed = await stream.get_final_response()
    return plain, streamed


def check(case: dict[str, Any], plain: Response, streamed: Response) -> None:
    expected = case["expected"]
    want = {"reasoning_content": expected["reasoning_content"], "content": expected["content"],
            "tool_calls": [{"name": c["name"], "arguments": c["arguments"]}
                           for c in expected["tool_calls"]]}
    cut = cut_call_of(case)
    if cut is not None:  # api.md "Cut calls": an incomplete item, the fragments as written
        want["content"], name, fragments = cut
        want["tool_calls"].append({"name": name, "arguments": ("incomplete", fragments)})
    assert view(plain) == want
    assert view(streamed) == want
    status = "incomplete" if case.get("finish") == "length" else "completed"
    assert plain.status == streamed.status == status
    assert plain.usage == streamed.usage
    assert plain.usage.output_tokens > 0
    assert [i.type for i in plain.output] == [i.type for i in streamed.output]
    for response in (plain, streamed):
        calls = [i.call_id for i in response.output if i.type == "function_call"]
        assert all(c.startswith("call_") for c in calls) and len(set(calls)) == len(calls)
        for item in response.output:
            if item.type == "reasoning":
                assert item.encrypted_content  # what Codex replays


@pytest.mark.parametrize("case_id", PARSE_IDS)
async def test_parse_cases(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = PARSE[case_id]
    check(case, *await run_both(proxy, fake, case))


@pytest.mark.parametrize("case_id", list(WILD))
async def test_wild_cases(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = WILD[case_id]
    check(case, *await run_both(proxy, fake, case))
