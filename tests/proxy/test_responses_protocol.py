"""/v1/responses beyond the recorded cases: the wire against the SDK's own models, Codex-style
tool round trips (store: false, replayed reasoning), previous_response_id, keep-alives,
errors and the endpoint label on /metrics."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.response_store import ResponseStore
from proxy.signature import ReasoningSigner
from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer, StartProxy
from tests.proxy.test_anthropic_protocol import CALL, EOS, SECRET, metric, recovering, scrape

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
USER = {"role": "user", "content": [{"type": "input_text", "text": "Weather in Taipei?"}]}
EVENTS = TypeAdapter(ResponseStreamEvent)


async def post(proxy: ProxyServer, body: dict[str, Any]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/responses", json=body) as r:
        return r.status, await r.text()


def sse_events(body: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in re.findall(r"^data: (.*)$", body, flags=re.M)]


async def test_wire_validates_against_sdk_models(proxy: ProxyServer, fake: FakeUpstream) -> None:
    request = {"model": "deepseek-reasoner", "input": [USER], "tools": [WEATHER]}
    fake.push(CALL, CALL)
    status, body = await post(proxy, request)
    assert status == 200
    plain = Response.model_validate_json(body)  # strict: every required field, right types
    assert [i.type for i in plain.output] == ["reasoning", "function_call"]
    status, body = await post(proxy, {**request, "stream": True})
    events = [EVENTS.validate_python(e) for e in sse_events(body)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert [k for j, k in enumerate(kinds) if k != kinds[j - 1]] == [  # repeats collapsed
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Taipei"}
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed"
    assert final.usage.output_tokens_details.reasoning_tokens > 0


async def test_codex_round_trip_replays_reasoning(start_proxy: StartProxy,
                                                  fake: FakeUpstream) -> None:
    proxy = await start_proxy(reasoning_signing_secret=SECRET, reasoning_cache_size=0)
    client = proxy.client()
    fake.push(CALL)
    first = await client.responses.create(model="deepseek-reasoner", input=[USER],
                                          tools=[WEATHER], store=False,
                                          instructions="You are a weather bot.")
    call = first.output[-1]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25C"}

    async def prompt_for(replayed: list[dict[str, Any]]) -> str:
        fake.push("Nice.</think>It is sunny." + EOS)
        second = await client.responses.create(
            model="deepseek-reasoner", input=[USER, *replayed, output], tools=[WEATHER],
            store=False, instructions="You are a weather bot.")
        assert second.output_text == "It is sunny."
        return fake.prompt_text()

    # Codex sends reasoning items back without their clear text, only encrypted_content.
    items = [i.model_dump(exclude_none=True) for i in first.output]
    codex = [{k: v for k, v in i.items() if k != "content"} for i in items]
    prompt = await prompt_for(codex)
    assert prompt.startswith("<｜begin▁of▁sentence｜>You are a weather bot.")
    assert "I need the weather.</think>" in prompt and "sunny, 25C" in prompt
    assert await prompt_for(items) == prompt
    forged = [{**codex[0], "encrypted_content": codex[0]["encrypted_content"][:-2] + "xx"},
              codex[1]]
    assert await prompt_for(forged) == prompt.replace("I need the weather.", "")
    clear_only = [items[0] | {"encrypted_content": None}, items[1]]
    assert await prompt_for(clear_only) == prompt.replace("I need the weather.", "")


async def test_previous_response_id(proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    fake.push(CALL)
    first = await client.responses.create(model="deepseek-reasoner", input=[USER],
                                          tools=[WEATHER], instructions="Be brief.")
    call = first.output[-1]
    fake.push("Nice.</think>It is sunny." + EOS)
    second = await client.responses.create(
        model="deepseek-reasoner", previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert second.previous_response_id == first.id
    prompt = fake.prompt_text()
    assert "Weather in Taipei?" in prompt and "I need the weather.</think>" in prompt
    assert "Be brief." not in prompt  # instructions are not carried over (as on OpenAI)
    fake.push("ok" + EOS)
    unstored = await client.responses.create(model="deepseek-chat", input="hi", store=False)
    with pytest.raises(openai.BadRequestError) as missing:
        await client.responses.create(model="deepseek-chat", input="again",
                                      previous_response_id=unstored.id)
    assert missing.value.code == "previous_response_not_found"


def test_response_store_bounds() -> None:
    now = [0.0]
    store = ResponseStore(max_entries=2, ttl_s=10, clock=lambda: now[0])
    for k in range(3):
        store.put(f"r{k}", [{"role": "user", "content": str(k)}])
    assert store.get("r0") is None and store.get("r2") is not None and len(store) == 2
    now[0] = 10.0
    assert store.get("r2") is None and len(store) == 0
    off = ResponseStore(max_entries=0, ttl_s=10)
    off.put("r", [])
    assert off.get("r") is None


async def test_request_fields_reach_the_prompt(proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    fake.push('{"city": "Oslo"}' + EOS)
    await client.responses.create(
        model="deepseek-v4", input="Give JSON.", reasoning={"effort": "none"},
        max_output_tokens=77, temperature=0.3, top_p=0.8,
        text={"format": {"type": "json_schema", "name": "city", "strict": False,
                         "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    sent = fake.requests[-1]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (77, 0.3, 0.8)
    prompt = fake.prompt_text()
    assert prompt.endswith("</think>")  # effort "none": thinking off
    assert '"city"' in prompt.split("Give JSON.")[0]  # the schema is in the system prompt
    # A named tool_choice is forced by the turn runner; parallel_tool_calls false keeps one.
    fake.push("<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
              "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter "
              "name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
              "</｜DSML｜tool_calls>" + EOS)
    forced = await client.responses.create(
        model="deepseek-chat", input=[USER], tools=[WEATHER], parallel_tool_calls=False,
        tool_choice={"type": "function", "name": "get_weather"})
    assert [(i.name, json.loads(i.arguments)) for i in forced.output] == [
        ("get_weather", {"city": "Rome"})]
    assert forced.parallel_tool_calls is False


async def test_keepalive_comments(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(keepalive_interval_s=0.05)
    fake.push(Reply("Hm.</think>Hi." + EOS, token_delay_s=0.2))
    status, body = await post(proxy, {"model": "deepseek-reasoner", "input": "hi",
                                      "stream": True})
    assert status == 200
    assert body.count(": keep-alive\n\n") >= 3
    assert sse_events(body)[-1]["response"]["output"][-1]["content"][0]["text"] == "Hi."
    fake.push(Reply("Hm.</think>Hi." + EOS, token_delay_s=0.2))
    async with proxy.client().responses.stream(model="deepseek-reasoner", input="hi") as stream:
        assert (await stream.get_final_response()).output_text == "Hi."
    text = await scrape(proxy)
    assert metric(text, "dsml_proxy_overhead_seconds_sum", endpoint="responses") < 0.5


async def test_errors(proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="gpt-5-codex", input="hi")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model="deepseek-chat", input="hi",
                                      tools=[{"type": "web_search"}])
    assert "web_search" in bad.value.message
    fake.push(Reply("boom", status=500))
    with pytest.raises(openai.InternalServerError) as upstream:
        await client.responses.create(model="deepseek-chat", input="hi")
    assert upstream.value.status_code == 502
    fake.push(Reply("a b c d e f g h" + EOS, close_after_tokens=3))
    stream = await client.responses.create(model="deepseek-chat", input="hi", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.code == "upstream_error"


async def test_metrics_count_per_endpoint(proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    fake.push(CALL, CALL)
    await client.responses.create(model="deepseek-reasoner", input=[USER], tools=[WEATHER])
    async with client.responses.stream(model="deepseek-reasoner", input=[USER],
                                       tools=[WEATHER]) as stream:
        await stream.get_final_response()
    text = await scrape(proxy)
    assert metric(text, "dsml_proxy_requests_total", endpoint="responses", status="200") == 2
    assert metric(text, "dsml_proxy_requests_total", endpoint="messages", status="200") == 0
    assert metric(text, "dsml_proxy_request_duration_seconds_count", endpoint="responses",
                  stream="true") == 1
    assert metric(text, "dsml_proxy_time_to_first_token_seconds_count", endpoint="responses") == 2
    assert metric(text, "dsml_proxy_tool_turns_total",
                  endpoint="responses", outcome="tool_calls") == 2
    assert metric(text, "dsml_proxy_tool_calls_total", endpoint="responses", outcome="valid") == 2
    for other in ("chat_completions", "messages"):
        assert metric(text, "dsml_proxy_tool_turns_total",
                      endpoint=other, outcome="tool_calls") == 0


def test_sealed_reasoning_round_trips_and_rejects_tampering() -> None:
    signer = ReasoningSigner(SECRET.encode())
    blob = signer.seal("Plan: ünïcode ✓")
    assert signer.unseal(blob) == "Plan: ünïcode ✓"
    body, _, signature = blob.partition("~")
    other = signer.seal("Plan B")
    assert signer.unseal(other.partition("~")[0] + "~" + signature) is None
    assert signer.unseal(body + "~" + signature[:-1]) is None
    assert signer.unseal("not base64 at all~x") is None
    assert signer.unseal(None) is None
    assert ReasoningSigner(b"another-secret-0123456789").unseal(blob) is None


@pytest.mark.parametrize("stream", [False, True])
async def test_empty_turn_is_recovered(proxy: ProxyServer, fake: FakeUpstream,
                                       stream: bool) -> None:
    fake.responder = recovering(fake)
    response = await create(proxy, stream, model="deepseek-reasoner", input=[USER],
                            tools=[WEATHER])
    assert len(fake.requests) == 2
    reasoning, call = response.output
    assert reasoning.content[0].text.endswith("for Paris.")
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    text = await scrape(proxy)
    assert metric(text, "dsml_proxy_tool_turns_total",
                  endpoint="responses", outcome="recovered_empty") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_held_back_marker_is_released(proxy: ProxyServer, fake: FakeUpstream,
                                            stream: bool) -> None:
    fake.push("The answer is 2 <" + EOS)
    response = await create(proxy, stream, model="deepseek-chat", input=[USER], tools=[WEATHER])
    assert [i.type for i in response.output] == ["message"]
    assert response.output_text == "The answer is 2 <"


async def create(proxy: ProxyServer, stream: bool, **request: Any) -> Response:
    client = proxy.client()
    if not stream:
        return await client.responses.create(**request)
    async with client.responses.stream(**request) as s:
        return await s.get_final_response()


async def test_disconnect_while_silent_cancels_upstream(start_proxy: StartProxy,
                                                        fake: FakeUpstream) -> None:
    """The client leaves between two keep-alives: the pending read of the engine is cancelled."""
    proxy = await start_proxy(keepalive_interval_s=0.05)
    fake.push(Reply("Hm, " * 20 + EOS, token_delay_s=0.3))
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/responses", json={
            "model": "deepseek-reasoner", "input": "hi", "stream": True}) as r:
        seen = b""
        while b": keep-alive" not in seen:
            seen += await r.content.readany()
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    assert fake.num_active == 0
