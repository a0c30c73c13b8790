"""Recorded DeepSeek-V4 completions through the whole stack, with the real openai SDK.

The fake engine replays each completion token by token; the proxy must return what the
reference parser returns (parse.jsonl) or what the spec asks for (wild.jsonl), and the SDK's
stream accumulator must rebuild exactly the non-streaming message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer, load_cases

PARSE = load_cases("parse.jsonl")
WILD = load_cases("wild.jsonl")
# Every 6th case keeps the run short on two shared cores while covering every shape (cases
# come in thinking/chat pairs, with 0-3 calls); every multi-call case is a parallel-call test.
PARSE_IDS = [cid for k, cid in enumerate(PARSE) if k % 6 == 0]
PARALLEL_IDS = [cid for cid, c in PARSE.items() if len(c["expected"]["tool_calls"]) >= 2][::4]


def request_for(case: dict[str, Any]) -> dict[str, Any]:
    req: dict[str, Any] = {
        "model": "deepseek-reasoner" if case["thinking"] else "deepseek-chat",
        "messages": [{"role": "user", "content": "Go."}],
    }
    if case["tools"]:
        req["tools"] = case["tools"]
    return req


def reply_for(case: dict[str, Any]) -> Reply:
    return Reply(case["completion"], finish_reason=case.get("finish", "stop"))


def message_view(message: Any) -> dict[str, Any]:
    """What must agree between expected, non-streaming and accumulated-stream messages."""
    calls = message.tool_calls or []
    return {
        "reasoning_content": getattr(message, "reasoning_content", None) or "",
        "content": message.content or "",
        "tool_calls": [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                       for c in calls],
    }


async def run_both(proxy: ProxyServer, fake: FakeUpstream, case: dict[str, Any]):
    client = proxy.client()
    fake.push(reply_for(case))
    plain = await client.chat.completions.create(**request_for(case))
    fake.push(reply_for(case))
    state = ChatCompletionStreamState()
    stream = await client.chat.completions.create(
        **request_for(case), stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        state.handle_chunk(chunk)
    if case.get("finish") == "length":  # get_final_completion() raises on length by design
        return plain, state.current_completion_snapshot
    return plain, state.get_final_completion()


def check(case: dict[str, Any], plain: Any, streamed: Any) -> None:
    expected = case["expected"]
    want = {
        "reasoning_content": expected["reasoning_content"],
        "content": expected["content"],
        "tool_calls": [{"name": c["name"], "arguments": c["arguments"]}
                       for c in expected["tool_calls"]],
    }
    assert message_view(plain.choices[0].message) == want
    streamed_view = message_view(streamed.choices[0].message)
    if case.get("finish") == "length" and streamed_view["tool_calls"]:
        # A call cut by max_tokens was already streamed when the cut came (as OpenAI's own
        # API does); its fragments still form valid JSON and finish_reason says "length".
        # The non-streaming response, decided at the end, returns the raw text as content.
        assert all(c["name"] in {t["function"]["name"] for t in case["tools"]}
                   for c in streamed_view["tool_calls"])
        streamed_view["tool_calls"] = []
    assert streamed_view == want
    finish = "tool_calls" if want["tool_calls"] else case.get("finish", "stop")
    assert plain.choices[0].finish_reason == finish
    assert streamed.choices[0].finish_reason == finish
    assert plain.usage == streamed.usage
    assert plain.usage.completion_tokens > 0
    if want["tool_calls"]:
        ids = [c.id for c in plain.choices[0].message.tool_calls]
        assert all(i.startswith("call_") and len(i) >= 29 for i in ids), ids
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case_id", PARSE_IDS)
async def test_parse_cases(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = PARSE[case_id]
    plain, streamed = await run_both(proxy, fake, case)
    check(case, plain, streamed)


@pytest.mark.parametrize("case_id", PARALLEL_IDS)
async def test_parallel_calls(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = PARSE[case_id]
    plain, streamed = await run_both(proxy, fake, case)
    check(case, plain, streamed)
    assert len(plain.choices[0].message.tool_calls) >= 2


@pytest.mark.parametrize("case_id", list(WILD))
async def test_wild_cases(proxy: ProxyServer, fake: FakeUpstream, case_id: str) -> None:
    case = WILD[case_id]
    plain, streamed = await run_both(proxy, fake, case)
    check(case, plain, streamed)


@pytest.mark.parametrize("case_id", ["w-think-terminal", "w-think-quoted", "w-self-closing",
                                     *PARALLEL_IDS[:3]])
async def test_engines_that_emit_eos_text(start_proxy: Any, case_id: str) -> None:
    """llama.cpp (--special) and ds4 stream EOS as text; vLLM does not. Same result."""
    case = {**PARSE, **WILD}[case_id]
    async with FakeUpstream(keep_eos=True) as eos_fake:
        proxy = await start_proxy(upstream=eos_fake.url)
        plain, streamed = await run_both(proxy, eos_fake, case)
        check(case, plain, streamed)
        assert len(eos_fake.requests) == 2  # no recovery continuation was needed
