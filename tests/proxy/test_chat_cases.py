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

from dsml.events import CallOutcome, ContentDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from dsml.parser import StreamParser
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


def message_view(message: Any, *, raw: bool = False) -> dict[str, Any]:
    """What must agree between expected, non-streaming and accumulated-stream messages."""
    calls = message.tool_calls or []
    return {
        "reasoning_content": getattr(message, "reasoning_content", None) or "",
        "content": message.content or "",
        "tool_calls": [{"name": c.function.name, "arguments": c.function.arguments if raw
                        else json.loads(c.function.arguments)} for c in calls],
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def cut_call_of(case: dict[str, Any]) -> tuple[str, str, str] | None:
    """For a case whose output cuts a call (api.md "Cut calls"): the content a client sees
    (the parser's, without its copy of the cut block), the call's name and its argument
    fragments, from the parser's own events. None when no call is cut."""
    if case.get("finish") != "length" or not case["tools"]:
        return None
    parser = StreamParser(case["tools"], case["thinking"])
    events = parser.feed(case["completion"]) + parser.finish()
    ends = [e for e in events if isinstance(e, ToolCallEnd) and e.outcome is CallOutcome.TRUNCATED]
    if not ends:
        return None
    index = ends[0].index
    name = next(e.name for e in events if isinstance(e, ToolCallStart) and e.index == index)
    fragments = "".join(e.fragment for e in events
                        if isinstance(e, ToolCallArgsDelta) and e.index == index)
    cut_text = "".join(e.text for e in events[events.index(ends[0]):]
                       if isinstance(e, ContentDelta))
    return parser.result.content.removesuffix(cut_text), name, fragments


def check_cut(case: dict[str, Any], plain: Any, streamed: Any, want: dict[str, Any]) -> bool:
    """api.md "Cut calls": a call cut by max_tokens is shown as the model wrote it, in the
    stream and in the body alike; the parser's copy of its block as content (the recorded
    expectation, dsml.md's "nothing is lost") is not repeated. True if the case had one."""
    view = message_view(plain.choices[0].message, raw=True)
    assert message_view(streamed.choices[0].message, raw=True) == view
    calls = view["tool_calls"]
    if not calls or _parses(calls[-1]["arguments"]):
        return False
    calls.pop()
    assert all(_parses(c["arguments"]) for c in calls)
    assert [{**c, "arguments": json.loads(c["arguments"])} for c in calls] == want["tool_calls"]
    assert want["content"].startswith(view["content"]) and "DSML" not in view["content"]
    assert "DSML" in want["content"][len(view["content"]):]  # the cut block: now the call
    assert plain.choices[0].finish_reason == streamed.choices[0].finish_reason == "length"
    return True


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
    if case.get("finish") == "length" and check_cut(case, plain, streamed, want):
        assert plain.usage == streamed.usage
        return
    assert message_view(plain.choices[0].message) == want
    assert message_view(streamed.choices[0].message) == want
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
