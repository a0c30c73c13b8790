"""POST /v1/messages with the real `anthropic` SDK, over the replaying fake engine.

The same recorded completions as the chat tests (parse.jsonl subset, every wild.jsonl case:
held-back markers, thinking recovery, malformed and truncated blocks) go through
`messages.create` and `messages.stream`; the SDK's accumulated stream must equal the
non-streaming message, and both must say what the reference parser says.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from proxy.encoders.anthropic import partial_input
from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import ProxyServer, load_cases
from tests.proxy.test_chat_cases import PARSE_IDS, cut_call_of, reply_for

PARSE = load_cases("parse.jsonl")
WILD = load_cases("wild.jsonl")


def client_for(proxy: ProxyServer, **kw: Any) -> anthropic.AsyncAnthropic:
    kw.setdefault("api_key", "unused")
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    return anthropic.AsyncAnthropic(base_url=proxy.url, **kw)


def tools_for(case: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
             "input_schema": t["function"].get("parameters") or {"type": "object"}}
            for t in case["tools"]]


def request_for(case: dict[str, Any]) -> dict[str, Any]:
    req: dict[str, Any] = {
        "model": "deepseek-reasoner" if case["thinking"] else "deepseek-chat",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Go."}],
    }
    if case["tools"]:
        req["tools"] = tools_for(case)
    return req


def view(message: anthropic.types.Message) -> dict[str, Any]:
    return {
        "reasoning_content": "".join(b.thinking for b in message.content if b.type == "thinking"),
        "content": "".join(b.text for b in message.content if b.type == "text"),
        "tool_calls": [{"name": b.name, "arguments": b.input}
                       for b in message.content if b.type == "tool_use"],
    }


async def run_both(proxy: ProxyServer, fake: FakeUpstream, case: dict[str, Any]):
    async with client_for(proxy) as client:
        fake.push(reply_for(case))
        plain = await client.messages.create(**request_for(case))
        fake.push(reply_for(case))
        async with client.messages.stream(**request_for(case)) as stream:
            streamed = await stream.get_final_message()
    return plain, streamed


def check(case: dict[str, Any], plain: Any, streamed: Any) -> None:
    expected = case["expected"]
    want = {"reasoning_content": expected["reasoning_content"], "content": expected["content"],
            "tool_calls": [{"name": c["name"], "arguments": c["arguments"]}
                           for c in expected["tool_calls"]]}
    cut = cut_call_of(case)
    if cut is not None:  # api.md "Cut calls": shown as cut, its input the SDK's partial parse
        want["content"], name, fragments = cut
        want["tool_calls"].append({"name": name, "arguments": partial_input(fragments)})
    assert view(plain) == want
    assert view(streamed) == want
    stop = {"stop": "end_turn", "length": "max_tokens"}[case.get("finish", "stop")]
    stop = "tool_use" if want["tool_calls"] and cut is None else stop
    assert plain.stop_reason == streamed.stop_reason == stop
    assert plain.usage.input_tokens == streamed.usage.input_tokens > 0
    assert plain.usage.output_tokens == streamed.usage.output_tokens > 0
    for message in (plain, streamed):
        ids = [b.id for b in message.content if b.type == "tool_use"]
        assert all(i.startswith("toolu_") and len(i) >= 30 for i in ids), ids
        assert len(set(ids)) == len(ids)
        signatures = [b.signature for b in message.content if b.type == "thinking"]
        assert all(signatures), "every thinking block is signed"
    assert [b.type for b in plain.content] == [b.type for b in streamed.content]
    assert ([b.signature for b in plain.content if b.type == "thinking"]
            == [b.signature for b in streamed.content if b.type == "thinking"])


@pytest.mark.parametrize("case_id", PARSE_IDS)
async def test_parse_cases(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = PARSE[case_id]
    check(case, *await run_both(proxy, fake, case))


@pytest.mark.parametrize("case_id", list(WILD))
async def test_wild_cases(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = WILD[case_id]
    check(case, *await run_both(proxy, fake, case))


async def test_plain_text_and_system(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push("Hi.</think>Hello there!<｜end▁of▁sentence｜>")
    async with client_for(proxy) as client:
        message = await client.messages.create(
            model="deepseek-v4", max_tokens=100, system=[{"type": "text", "text": "Be brief."}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            metadata={"user_id": "u1"},
            # This SDK release dropped the sampling keywords; older clients still send them.
            extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20})
    assert message.id.startswith("msg_")
    assert message.model == "deepseek-v4"
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[1].text == "Hello there!"
    assert message.stop_reason == "end_turn"
    prompt = fake.prompt_text()
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.")
    sent = fake.requests[-1]
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.5, 0.9, 20)
