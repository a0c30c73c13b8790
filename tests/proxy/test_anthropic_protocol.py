"""/v1/messages beyond the recorded cases: tool round trips, signed thinking, count_tokens,
errors in Anthropic's shape, pings, disconnects and the endpoint label on /metrics."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import anthropic
import pytest

from dsml.dialects import EFFORT_ABSOLUTE_MAXIMUM
from dsml.request import render_chat
from proxy.signature import ReasoningSigner
from proxy.translate.anthropic import effort_for_budget, to_chat
from schemas.anthropic import MessagesRequest
from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer, StartProxy
from tests.proxy.test_anthropic import client_for

EOS = "<｜end▁of▁sentence｜>"
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
CALL = ("I need the weather.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Taipei</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
SECRET = "test-secret-0123456789abcdef"
USER = {"role": "user", "content": "Weather in Taipei?"}

async def final_message(proxy: ProxyServer, request: dict[str, Any], *, stream: bool) -> Any:
    """The SDK's message for `request`: created, or streamed and accumulated."""
    async with client_for(proxy) as client:
        if not stream:
            return await client.messages.create(**request)
        async with client.messages.stream(**request) as s:
            return await s.get_final_message()



def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}}")


async def scrape(proxy: ProxyServer) -> str:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        return await r.text()


async def test_tool_round_trip_rerenders_signed_thinking(
        start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(reasoning_signing_secret=SECRET)
    async with client_for(proxy) as client:
        fake.push(CALL)
        first = await client.messages.create(model="deepseek-reasoner", max_tokens=1000,
                                             tools=[WEATHER], messages=[USER])
        assert first.stop_reason == "tool_use"
        thinking, call = first.content
        assert thinking.type == "thinking" and thinking.thinking == "I need the weather."
        assert call.type == "tool_use" and call.input == {"city": "Taipei"}
        fake.push("Sunny it is.</think>It is sunny." + EOS)
        history = [USER, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                   {"role": "user", "content": [
                       {"type": "tool_result", "tool_use_id": call.id,
                        "content": [{"type": "text", "text": "sunny, 25C"}]}]}]
        second = await client.messages.create(model="deepseek-reasoner", max_tokens=1000,
                                              tools=[WEATHER], messages=history)
    assert second.content[-1].text == "It is sunny."
    assert second.stop_reason == "end_turn"
    # The replayed turn renders exactly as the same conversation through chat completions.
    chat = proxy.client()
    fake.push("x</think>y" + EOS)
    await chat.chat.completions.create(model="deepseek-reasoner", tools=[{
        "type": "function", "function": {"name": WEATHER["name"],
                                         "description": WEATHER["description"],
                                         "parameters": WEATHER["input_schema"]}}], messages=[
        USER, {"role": "assistant", "content": None, "reasoning_content": "I need the weather.",
               "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Taipei"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25C"}])
    assert fake.prompt_text(-2) == fake.prompt_text(-1)
    assert "I need the weather.</think>" in fake.prompt_text(-2)


async def test_unverifiable_thinking_is_dropped(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(reasoning_signing_secret=SECRET)
    signer = ReasoningSigner(SECRET.encode())
    call = {"type": "tool_use", "id": "toolu_from_elsewhere", "name": "get_weather",
            "input": {"city": "Oslo"}}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                           "content": "rain", "is_error": True}]}

    async def prompt_with(thinking: dict[str, Any]) -> str:
        fake.push("ok</think>ok" + EOS)
        async with client_for(proxy) as client:
            await client.messages.create(model="deepseek-reasoner", max_tokens=100,
                                         tools=[WEATHER], messages=[
                                             USER, {"role": "assistant", "content": [thinking, call]},
                                             result])
        return fake.prompt_text()

    good = await prompt_with({"type": "thinking", "thinking": "Plan A.",
                              "signature": signer.sign("Plan A.")})
    assert "Plan A.</think>" in good
    assert "Error: rain" in good  # is_error reaches the model
    forged = await prompt_with({"type": "thinking", "thinking": "Plan B.",
                                "signature": signer.sign("Plan A.")})
    assert "Plan B." not in forged
    assert forged == good.replace("Plan A.", "")


async def test_count_tokens_matches_usage(proxy: ProxyServer, fake: FakeUpstream) -> None:
    request: dict[str, Any] = {"model": "deepseek-reasoner", "tools": [WEATHER],
                               "system": "Be brief.", "messages": [USER]}
    async with client_for(proxy) as client:
        counted = await client.messages.count_tokens(**request)
        fake.push(CALL)
        message = await client.messages.create(max_tokens=100, **request)
    assert counted.input_tokens == message.usage.input_tokens > 20


def test_thinking_budget_maps_to_effort() -> None:
    assert [effort_for_budget(b) for b in (1024, 4000, 10000, 24575, 31999)] == [
        "low", "low", "high", "high", "max"]
    signer = ReasoningSigner(SECRET.encode())

    def prompt(**kw: Any) -> str:
        req = MessagesRequest.model_validate(
            {"model": "deepseek-v4", "max_tokens": 10, "messages": [USER], **kw})
        return render_chat(to_chat(req, signer)[0], default_thinking=False).text

    assert prompt().endswith("</think>")  # no `thinking`: the model's default (here off)
    assert prompt(thinking={"type": "disabled"}).endswith("</think>")
    assert prompt(thinking={"type": "adaptive"}).endswith("<think>")
    assert EFFORT_ABSOLUTE_MAXIMUM in prompt(thinking={"type": "enabled", "budget_tokens": 31999})
    assert EFFORT_ABSOLUTE_MAXIMUM not in prompt(thinking={"type": "enabled", "budget_tokens": 10000})
    assert EFFORT_ABSOLUTE_MAXIMUM in prompt(thinking={"type": "adaptive"},
                                             output_config={"effort": "max"})


async def test_tool_choice_and_stop_sequences(proxy: ProxyServer, fake: FakeUpstream) -> None:
    # tool_choice "tool" is forced by the turn runner: the model continues inside the invoke.
    fake.push("<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
              "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    async with client_for(proxy) as client:
        forced = await client.messages.create(
            model="deepseek-chat", max_tokens=100, tools=[WEATHER], messages=[USER],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
        assert [(b.name, b.input) for b in forced.content] == [("get_weather", {"city": "Rome"})]
        fake.push("one two three" + EOS)
        stopped = await client.messages.create(model="deepseek-chat", max_tokens=100,
                                               messages=[USER], stop_sequences=["three"])
    assert stopped.content[0].text == "one two "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "three")
    assert fake.requests[-1]["stop"] == ["three"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("completion", "expected"), [
    # The backend says which stop string matched (vLLM's `stop_reason`): that one is named,
    # whichever of several it was.
    ("one two three four", ("stop_sequence", "three", "one two ")),
    ("one two four three", ("stop_sequence", "four", "one two ")),
    # A natural end (EOS, which vLLM does not emit as text) with stop_sequences set is
    # end_turn, not a guessed stop_sequence.
    ("one two" + EOS, ("end_turn", None, "one two")),
])
async def test_stop_sequence_is_the_one_that_matched(
        proxy: ProxyServer, fake: FakeUpstream, stream: bool, completion: str,
        expected: tuple[str, str | None, str]) -> None:
    request: dict[str, Any] = {"model": "deepseek-chat", "max_tokens": 100, "messages": [USER],
                               "stop_sequences": ["zzz", "three", "four"]}
    fake.push(completion)
    message = await final_message(proxy, request, stream=stream)
    assert (message.stop_reason, message.stop_sequence, message.content[0].text) == expected


async def test_stop_sequence_unknown_to_the_backend_is_end_turn(start_proxy: StartProxy) -> None:
    # llama.cpp's and ds4's /v1/completions do not say which stop string matched: the
    # proxy does not guess.
    async with FakeUpstream(report_stop_reason=False) as quiet:
        proxy = await start_proxy(upstream=quiet.url)
        quiet.push("one two three")
        async with client_for(proxy) as client:
            message = await client.messages.create(model="deepseek-chat", max_tokens=100,
                                                   messages=[USER], stop_sequences=["three"])
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.content[0].text == "one two "


async def test_errors_in_anthropic_shape(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(api_keys="k1")
    async with client_for(proxy, api_key="wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await client.messages.create(model="deepseek-chat", max_tokens=10, messages=[USER])
    assert auth.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": auth.value.body["error"]["message"]}}
    async with client_for(proxy, api_key=None, auth_token="k1") as client:  # Claude Code's header
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="claude-unknown", max_tokens=10, messages=[USER])
        assert missing.value.body["error"]["type"] == "not_found_error"
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(model="deepseek-chat", max_tokens=10, messages=[USER],
                                         tools=[{"type": "web_search_20250305", "name": "web"}])
        assert bad.value.body["error"]["type"] == "invalid_request_error"
        assert "web_search_20250305" in bad.value.body["error"]["message"]
    async with aiohttp.ClientSession() as s, s.post(
            proxy.url + "/v1/messages", headers={"x-api-key": "k1"},
            json={"model": "deepseek-chat", "messages": [USER]}) as r:  # no max_tokens
        assert r.status == 400
        body = await r.json()
    assert body["type"] == "error" and "max_tokens" in body["error"]["message"]


async def test_overloaded_is_529(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(max_concurrency=1, max_queue=0)
    fake.push(Reply("slow" + EOS, delay_before_s=1.0))
    async with client_for(proxy) as client:
        first = asyncio.create_task(client.messages.create(
            model="deepseek-chat", max_tokens=10, messages=[USER]))
        while not fake.requests:
            await asyncio.sleep(0.01)
        with pytest.raises(anthropic.OverloadedError) as busy:
            await client.messages.create(model="deepseek-chat", max_tokens=10, messages=[USER])
        assert (await first).content[0].text == "slow"
    assert busy.value.status_code == 529
    assert busy.value.body["error"]["type"] == "overloaded_error"
    assert metric(await scrape(proxy), "dsml_proxy_requests_total",
                  endpoint="messages", status="529") == 1


async def test_upstream_failures(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    async with client_for(proxy) as client:
        fake.push(Reply("a b c d e f g h" + EOS, close_after_tokens=3))
        with pytest.raises(anthropic.APIStatusError) as mid:
            async with client.messages.stream(model="deepseek-chat", max_tokens=100,
                                              messages=[USER]) as stream:
                await stream.get_final_message()
        assert mid.value.body["type"] == "error"
        assert mid.value.body["error"]["type"] == "api_error"
        fake.push(Reply("boom", status=500))
        with pytest.raises(anthropic.APIStatusError) as before:
            await client.messages.create(model="deepseek-chat", max_tokens=10, messages=[USER])
        assert before.value.status_code == 502
        assert before.value.body["error"]["type"] == "api_error"


async def test_pings_while_silent_and_overhead(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(keepalive_interval_s=0.05)
    fake.push(Reply("Hm.</think>Hi." + EOS, token_delay_s=0.2))
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/messages", json={
            "model": "deepseek-reasoner", "max_tokens": 100, "stream": True,
            "messages": [USER]}) as r:
        body = await r.text()
    names = re.findall(r"^event: (\S+)$", body, flags=re.M)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("ping") >= 4  # one after message_start, then while the engine is slow
    text = await scrape(proxy)
    # The silences the pings filled are backend waits, not this process's overhead.
    assert metric(text, "dsml_proxy_overhead_seconds_sum", endpoint="messages") < 0.5
    assert metric(text, "dsml_proxy_requests_total", endpoint="messages", status="200") == 1


async def test_disconnect_cancels_upstream(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push(Reply("word " * 500 + EOS, token_delay_s=0.01))
    client = client_for(proxy)
    async with client, client.messages.stream(model="deepseek-chat", max_tokens=1000,
                                              messages=[USER]) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                break
    await asyncio.wait_for(fake.disconnected.wait(), 5)


async def test_metrics_count_per_endpoint(proxy: ProxyServer, fake: FakeUpstream) -> None:
    async with client_for(proxy) as client:
        fake.push(CALL, CALL)
        await client.messages.create(model="deepseek-reasoner", max_tokens=100, tools=[WEATHER],
                                     messages=[USER])
        async with client.messages.stream(model="deepseek-reasoner", max_tokens=100,
                                          tools=[WEATHER], messages=[USER]) as stream:
            await stream.get_final_message()
    text = await scrape(proxy)
    assert metric(text, "dsml_proxy_requests_total", endpoint="messages", status="200") == 2
    assert metric(text, "dsml_proxy_requests_total", endpoint="chat_completions",
                  status="200") == 0
    assert metric(text, "dsml_proxy_request_duration_seconds_count", endpoint="messages",
                  stream="true") == 1
    assert metric(text, "dsml_proxy_tool_turns_total",
                  endpoint="messages", outcome="tool_calls") == 2
    assert metric(text, "dsml_proxy_tool_calls_total", endpoint="messages", outcome="valid") == 2
    # Per protocol (issue 5): the other endpoints' tool series stay at zero.
    for other in ("chat_completions", "responses"):
        assert metric(text, "dsml_proxy_tool_turns_total",
                      endpoint=other, outcome="tool_calls") == 0
        assert metric(text, "dsml_proxy_tool_calls_total", endpoint=other, outcome="valid") == 0


def test_tool_choice_mapping_and_signatures() -> None:
    signer = ReasoningSigner(SECRET.encode())

    def chat(**kw: Any) -> tuple[dict[str, Any], bool]:
        req = MessagesRequest.model_validate(
            {"model": "deepseek-v4", "max_tokens": 10, "messages": [USER], "tools": [WEATHER],
             **kw})
        return to_chat(req, signer)

    assert chat(tool_choice={"type": "any"})[0]["tool_choice"] == "required"
    assert chat(tool_choice={"type": "none"})[0]["tool_choice"] == "none"
    assert chat(tool_choice={"type": "auto", "disable_parallel_tool_use": True}) == (
        chat(tool_choice={"type": "auto"})[0], False)
    assert chat()[1] is True
    signature = signer.sign("text")
    assert signer.verify("text", signature)
    assert not signer.verify("text.", signature)
    assert not signer.verify("text", None)
    assert not ReasoningSigner(b"another-secret-0123456789").verify("text", signature)


THINK_ONLY = "The user wants the weather. I should call get_weather for Paris." + EOS
AFTER_THINK = ("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter "
               "name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
               "</｜DSML｜tool_calls>" + EOS)


def recovering(fake: FakeUpstream) -> Any:
    """A model that stops inside reasoning, then calls the tool once `</think>` is appended."""
    def respond(body: dict[str, Any]) -> Reply:
        if fake.tokenizer.decode(body["prompt"]).endswith("</think>"):
            return Reply(AFTER_THINK)
        return Reply(THINK_ONLY)
    return respond


@pytest.mark.parametrize("stream", [False, True])
async def test_empty_turn_is_recovered(proxy: ProxyServer, fake: FakeUpstream,
                                       stream: bool) -> None:
    fake.responder = recovering(fake)
    request: dict[str, Any] = {"model": "deepseek-reasoner", "max_tokens": 1000,
                               "tools": [WEATHER], "messages": [USER]}
    message = await final_message(proxy, request, stream=stream)
    assert len(fake.requests) == 2
    thinking, call = message.content
    assert thinking.thinking.endswith("for Paris.")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"
    text = await scrape(proxy)
    assert metric(text, "dsml_proxy_tool_turns_total",
                  endpoint="messages", outcome="recovered_empty") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_held_back_marker_is_released(proxy: ProxyServer, fake: FakeUpstream,
                                            stream: bool) -> None:
    fake.push("The answer is 2 <" + EOS)
    request: dict[str, Any] = {"model": "deepseek-chat", "max_tokens": 100,
                               "tools": [WEATHER], "messages": [USER]}
    message = await final_message(proxy, request, stream=stream)
    assert [(b.type, b.text) for b in message.content] == [("text", "The answer is 2 <")]
    assert message.stop_reason == "end_turn"


async def test_images(proxy: ProxyServer, fake: FakeUpstream) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "X"}}
    fake.push("ok" + EOS)
    async with client_for(proxy) as client:
        # A tool's image stays in the session's history: a placeholder, not a failing request.
        await client.messages.create(model="deepseek-chat", max_tokens=10, tools=[WEATHER],
                                     messages=[USER, {"role": "assistant", "content": [call]},
                                               {"role": "user", "content": [{
                                                   "type": "tool_result", "tool_use_id": "toolu_1",
                                                   "content": [image]}]}])
        assert "[image omitted: this model reads text only]" in fake.prompt_text()
        with pytest.raises(anthropic.BadRequestError) as sent:
            await client.messages.create(model="deepseek-chat", max_tokens=10, messages=[
                {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}])
    assert "image" in sent.value.body["error"]["message"]
