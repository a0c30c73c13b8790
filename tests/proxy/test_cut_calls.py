"""api.md "Cut calls": a call the output cut off never runs as if it were whole.

On every endpoint, streamed (through the SDKs' own accumulators) and not: the cut call's
arguments are exactly the fragments the model wrote (they do not parse), the finish reason
is `length` / `max_tokens` / `incomplete`, the cut block's DSML is not repeated as content,
and the turn counts as `truncated`. The exception: EOS right after a closed parameter, with
the required arguments there, is a whole call. Then a real agent loop (openai-agents'
streamed Runner, on Chat Completions and on Responses) must not run a cut `write_file`.
"""

from __future__ import annotations

import json
from typing import Any

import agents
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer
from tests.proxy.test_anthropic import client_for
from tests.proxy.test_turn_policy import metric, scrape

EOS = "<｜end▁of▁sentence｜>"
BODY = "".join(f"line {k}: the quick brown fox\n" for k in range(9)) + "and the end\n"
assert len(BODY) == 264
PREFACE = "I'll write it."
HEAD = (PREFACE + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"write_file\">\n"
        "<｜DSML｜parameter name=\"path\" string=\"true\">notes.txt</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"content\" string=\"true\">")
CUT = HEAD + BODY[:59]  # the case: 59 of 264 characters
WHOLE_PARAM = HEAD + BODY + "</｜DSML｜parameter>\n"  # the content parameter closed
FULL = WHOLE_PARAM + "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
PARAMS = {"type": "object", "properties": {"path": {"type": "string"},
                                           "content": {"type": "string"}},
          "required": ["path", "content"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": PARAMS}}]
MESSAGES = [{"role": "user", "content": "Write the notes."}]
CUT_ARGS = '{"path": "notes.txt", "content": ' + json.dumps(BODY[:59])[:-1]
WHOLE_ARGS = {"path": "notes.txt", "content": BODY}

# (model output, finish reason the engine gives): both end inside the content value.
CUTS = {"max_tokens": (CUT, "length"), "eos_in_value": (CUT + EOS, None)}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _chat_summary(completion: Any) -> tuple[Any, ...]:
    choice = completion.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


@pytest.mark.parametrize("case", list(CUTS))
async def test_chat_cut_call_stream_equals_body(
        proxy: ProxyServer, fake: FakeUpstream, case: str) -> None:
    text, finish = CUTS[case]
    client = proxy.client()
    request = {"model": "deepseek-chat", "messages": MESSAGES, "tools": CHAT_TOOLS}
    fake.push(Reply(text, finish_reason=finish))
    body = _chat_summary(await client.chat.completions.create(**request))
    fake.push(Reply(text, finish_reason=finish))
    async with client.chat.completions.stream(**request) as stream:
        async for _ in stream:
            pass
        streamed = _chat_summary(stream.current_completion_snapshot)  # the accumulator's
        with pytest.raises(openai.LengthFinishReasonError):  # the SDK's own refusal
            await stream.get_final_completion()
    assert streamed == body
    content, calls, finish_reason = body
    assert content == PREFACE  # the cut block's DSML is not repeated as content
    assert calls == [("write_file", CUT_ARGS)] and not _parses(CUT_ARGS)
    assert finish_reason == "length"
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total", endpoint="chat_completions",
                  outcome="truncated") == 2


async def test_eos_after_a_closed_parameter_is_a_whole_call(
        proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    request = {"model": "deepseek-chat", "messages": MESSAGES, "tools": CHAT_TOOLS}
    for text, finish, whole in ((WHOLE_PARAM + EOS, None, True),
                                (WHOLE_PARAM, "length", False)):
        fake.push(Reply(text, finish_reason=finish))
        body = _chat_summary(await client.chat.completions.create(**request))
        fake.push(Reply(text, finish_reason=finish))
        async with client.chat.completions.stream(**request) as stream:
            async for _ in stream:
                pass
            streamed = _chat_summary(stream.current_completion_snapshot)
        assert streamed == body
        ((_, arguments),) = body[1]
        assert body[0] == PREFACE
        if whole:  # the model ended its turn: the call is complete
            assert json.loads(arguments) == WHOLE_ARGS and body[2] == "tool_calls"
        else:  # max_tokens right after the parameter: still cut, never closed by the server
            assert not _parses(arguments) and body[2] == "length"


@pytest.mark.parametrize("case", list(CUTS))
async def test_messages_cut_call_stream_equals_body(
        proxy: ProxyServer, fake: FakeUpstream, case: str) -> None:
    text, finish = CUTS[case]
    request = {"model": "deepseek-chat", "max_tokens": 4096, "messages": MESSAGES,
               "tools": [{"name": "write_file", "input_schema": PARAMS}]}

    def summary(message: Any) -> tuple[Any, ...]:
        blocks = [(b.type, getattr(b, "text", None), getattr(b, "name", None),
                   getattr(b, "input", None)) for b in message.content]
        return blocks, message.stop_reason

    async with client_for(proxy) as client:
        fake.push(Reply(text, finish_reason=finish))
        body = summary(await client.messages.create(**request))
        fake.push(Reply(text, finish_reason=finish))
        async with client.messages.stream(**request) as stream:
            streamed = summary(await stream.get_final_message())
    assert streamed == body
    blocks, stop = body
    # The unfinished `content` string is not in the input (the SDK's partial parse drops
    # it), so the input lacks a required argument; and the turn stopped at max_tokens.
    assert blocks == [("text", PREFACE, None, None),
                      ("tool_use", None, "write_file", {"path": "notes.txt"})]
    assert stop == "max_tokens"
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total", endpoint="messages",
                  outcome="truncated") == 2


@pytest.mark.parametrize("case", list(CUTS))
async def test_responses_cut_call_stream_equals_body(
        proxy: ProxyServer, fake: FakeUpstream, case: str) -> None:
    text, finish = CUTS[case]
    client = proxy.client()
    request = {"model": "deepseek-chat", "input": "Write the notes.",
               "tools": [{"type": "function", "name": "write_file", "parameters": PARAMS}]}

    def summary(response: Any) -> tuple[Any, ...]:
        items = [{k: v for k, v in item.model_dump().items() if k not in ("id", "call_id")}
                 for item in response.output]
        return items, response.status, response.incomplete_details

    fake.push(Reply(text, finish_reason=finish))
    body = summary(await client.responses.create(**request))
    fake.push(Reply(text, finish_reason=finish))
    async with client.responses.stream(**request) as stream:
        events = [event async for event in stream]
    # The SDK's get_final_response() wants `response.completed`; an incomplete turn ends
    # with `response.incomplete`, whose response must hold what the items streamed.
    terminal = events[-1]
    assert terminal.type == "response.incomplete"
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.model_dump() for i in done] == [i.model_dump() for i in terminal.response.output]
    streamed = summary(terminal.response)
    assert streamed == body
    items, status, details = body
    assert [i["type"] for i in items] == ["message", "function_call"]
    assert items[0]["content"][0]["text"] == PREFACE
    assert items[1]["arguments"] == CUT_ARGS and items[1]["status"] == "incomplete"
    assert status == "incomplete" and details.reason == "max_output_tokens"
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total", endpoint="responses",
                  outcome="truncated") == 2


@pytest.mark.parametrize("case", list(CUTS))
@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_openai_agents_streamed_runner_never_runs_a_cut_call(
        proxy: ProxyServer, fake: FakeUpstream, api: str, case: str) -> None:
    text, finish = CUTS[case]
    agents.set_tracing_disabled(True)  # no trace export: nothing leaves loopback
    written: list[dict[str, str]] = []

    @agents.function_tool
    def write_file(path: str, content: str) -> str:
        """Write `content` to the file `path`."""
        written.append({"path": path, "content": content})
        return "written"

    # The first turn is cut inside write_file's content; any later turn answers in text.
    replies = iter([Reply(text, finish_reason=finish)])
    fake.responder = lambda body: next(replies, "I could not finish writing." + EOS)
    client = proxy.client()
    model: Any = (agents.OpenAIChatCompletionsModel("deepseek-chat", openai_client=client)
                  if api == "chat_completions"
                  else agents.OpenAIResponsesModel("deepseek-chat", openai_client=client))
    agent = agents.Agent(name="writer", instructions="Write files.", tools=[write_file],
                         model=model)
    result = agents.Runner.run_streamed(agent, "Write the notes.", max_turns=3,
                                        run_config=agents.RunConfig(tracing_disabled=True))
    try:
        async for _ in result.stream_events():
            pass
    except (agents.AgentsException, openai.BadRequestError):
        # openai-agents answers an unparsable call with an error result and replays the
        # call, which the renderer refuses (dsml.md 3.10: arguments must be JSON): the run
        # ends there. Ending is fine; running the cut call is the bug.
        pass
    assert written == []
    assert fake.requests  # the agent did talk to the server
    # And the same agent does run a whole call (the test can see a run).
    replies = iter([Reply(FULL)])
    result = agents.Runner.run_streamed(agent, "Write the notes.", max_turns=3,
                                        run_config=agents.RunConfig(tracing_disabled=True))
    async for _ in result.stream_events():
        pass
    assert written == [WHOLE_ARGS]
