"""/metrics: api.md's names, types and labels, all pre-initialised, and counts that match."""

from __future__ import annotations

import anthropic
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dsml.events import RepairKind, TurnOutcome
from proxy.metrics import ENDPOINTS, STATUSES, TURN_ENDPOINTS
from proxy.middleware import ENDPOINT_BY_PATH
from tests.fakes.upstream import FakeUpstream, Reply, refused_url
from tests.proxy.conftest import ProxyServer, StartProxy, load_cases
from tests.proxy.test_turn_policy import metric, scrape

API_MD = {  # name: (type, labels) as api.md's table, plus issue 5's `endpoint` on tool metrics
    "dsml_proxy_requests": ("counter", {"endpoint", "status"}),
    "dsml_proxy_inflight_requests": ("gauge", {"endpoint"}),
    "dsml_proxy_request_duration_seconds": ("histogram", {"endpoint", "stream"}),
    "dsml_proxy_time_to_first_token_seconds": ("histogram", {"endpoint"}),
    "dsml_proxy_inter_token_latency_seconds": ("histogram", set()),
    "dsml_proxy_overhead_seconds": ("histogram", {"endpoint"}),
    "dsml_proxy_tokens": ("counter", {"kind"}),
    "dsml_proxy_upstream_errors": ("counter", {"reason"}),
    "dsml_proxy_tool_turns": ("counter", {"endpoint", "outcome"}),
    "dsml_proxy_tool_calls": ("counter", {"endpoint", "outcome"}),
    "dsml_proxy_dsml_repairs": ("counter", {"kind"}),
    "dsml_proxy_build_info": ("gauge", {"version", "dialect", "backend"}),
}
MESSAGES = [{"role": "user", "content": "Go."}]


async def test_names_types_labels_and_zeros(proxy: ProxyServer) -> None:
    client = proxy.client()
    text = (await client._client.get(proxy.url + "/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in API_MD.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    samples = await scrape(proxy)
    for endpoint in ENDPOINTS:
        for status in STATUSES:
            assert ("dsml_proxy_requests_total",
                    (("endpoint", endpoint), ("status", status))) in samples
    # Tool metrics per endpoint that runs turns (raw /v1/completions does not parse DSML).
    assert set(TURN_ENDPOINTS) == {"chat_completions", "messages", "responses"}
    for endpoint in TURN_ENDPOINTS:
        for outcome in TurnOutcome:
            assert metric(samples, "dsml_proxy_tool_turns_total", endpoint=endpoint,
                          outcome=outcome.value) == 0
        for outcome in ("valid", "repaired", "schema_invalid", "invalid_json", "unknown_tool"):
            assert metric(samples, "dsml_proxy_tool_calls_total", endpoint=endpoint,
                          outcome=outcome) == 0
    tool_series = [k for k in samples if k[0] == "dsml_proxy_tool_turns_total"]
    assert len(tool_series) == len(TURN_ENDPOINTS) * len(TurnOutcome)
    for kind in RepairKind:
        assert metric(samples, "dsml_proxy_dsml_repairs_total", kind=kind.value) == 0
    for kind in ("prompt", "completion", "reasoning"):
        assert metric(samples, "dsml_proxy_tokens_total", kind=kind) == 0
    for reason in ("connect", "timeout", "status", "stream"):
        assert metric(samples, "dsml_proxy_upstream_errors_total", reason=reason) == 0
    build = [k for k in samples if k[0] == "dsml_proxy_build_info"]
    assert len(build) == 1 and dict(build[0][1])["backend"] == "upstream:vllm"
    assert dict(build[0][1])["dialect"] == "v4"
    # Sub-millisecond buckets for overhead, 30 minutes for whole turns.
    assert ("dsml_proxy_overhead_seconds_bucket",
            (("endpoint", "chat_completions"), ("le", "5e-05"))) in samples
    assert ("dsml_proxy_request_duration_seconds_bucket",
            (("endpoint", "chat_completions"), ("le", "1800.0"), ("stream", "true"))) in samples


async def test_counts_follow_what_happened(proxy: ProxyServer, fake: FakeUpstream,
                                           start_proxy: StartProxy) -> None:
    wild = load_cases("wild.jsonl")
    client = proxy.client()
    usage = []
    # 1: a repaired call (doubled bars + typographic quotes), streamed.
    fake.push(wild["w-doubled-bars-curly-quotes"]["completion"])
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=MESSAGES, tools=wild["w-doubled-bars-curly-quotes"]["tools"],
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            usage.append(chunk.usage)
    # 2: a plain answer with tools offered, thinking.
    fake.push("Thought.</think>Just text.<｜end▁of▁sentence｜>")
    resp = await client.chat.completions.create(
        model="deepseek-reasoner", messages=MESSAGES, tools=wild["w-json-body"]["tools"])
    usage.append(resp.usage)
    # 3: a truncated block (max_tokens).
    fake.push(Reply(wild["w-truncated"]["completion"], finish_reason="length"))
    resp = await client.chat.completions.create(
        model="deepseek-chat", messages=MESSAGES, tools=wild["w-truncated"]["tools"])
    usage.append(resp.usage)
    assert resp.choices[0].finish_reason == "length"
    # 4: no tools: not a tool turn.
    fake.push("Hi.<｜end▁of▁sentence｜>")
    usage.append((await client.chat.completions.create(model="deepseek-chat",
                                                      messages=MESSAGES)).usage)
    # 5: an engine error.
    fake.push(Reply(status=500, text="boom"))
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES)

    s = await scrape(proxy)
    assert metric(s, "dsml_proxy_requests_total", endpoint="chat_completions", status="200") == 4
    assert metric(s, "dsml_proxy_requests_total", endpoint="chat_completions", status="502") == 1
    chat = {"endpoint": "chat_completions"}
    assert metric(s, "dsml_proxy_tool_turns_total", **chat, outcome="tool_calls") == 1
    assert metric(s, "dsml_proxy_tool_turns_total", **chat, outcome="answer") == 1
    assert metric(s, "dsml_proxy_tool_turns_total", **chat, outcome="truncated") == 1
    all_turns = [v for (name, _), v in s.items() if name == "dsml_proxy_tool_turns_total"]
    assert sum(all_turns) == 3  # nothing counted under another endpoint
    assert metric(s, "dsml_proxy_tool_calls_total", **chat, outcome="repaired") == 1
    assert metric(s, "dsml_proxy_dsml_repairs_total", kind="doubled_bars") >= 1
    assert metric(s, "dsml_proxy_dsml_repairs_total", kind="typographic_quotes") >= 1
    assert metric(s, "dsml_proxy_upstream_errors_total", reason="status") == 1
    assert metric(s, "dsml_proxy_tokens_total", kind="prompt") == sum(u.prompt_tokens for u in usage)
    assert metric(s, "dsml_proxy_tokens_total", kind="completion") == sum(
        u.completion_tokens for u in usage)
    assert metric(s, "dsml_proxy_tokens_total", kind="reasoning") == sum(
        u.completion_tokens_details.reasoning_tokens for u in usage) > 0
    assert metric(s, "dsml_proxy_request_duration_seconds_count", endpoint="chat_completions",
                  stream="true") == 1
    assert metric(s, "dsml_proxy_request_duration_seconds_count", endpoint="chat_completions",
                  stream="false") == 4
    assert metric(s, "dsml_proxy_time_to_first_token_seconds_count",
                  endpoint="chat_completions") == 4
    assert metric(s, "dsml_proxy_overhead_seconds_count", endpoint="chat_completions") == 5
    assert metric(s, "dsml_proxy_inter_token_latency_seconds_count") > 10
    assert metric(s, "dsml_proxy_inflight_requests", endpoint="chat_completions") == 0

    down = await start_proxy(upstream=refused_url())
    with pytest.raises(openai.InternalServerError):
        await down.client().chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    s = await scrape(down)
    assert metric(s, "dsml_proxy_upstream_errors_total", reason="connect") == 1


def test_every_route_has_a_preinitialised_endpoint_label(proxy: ProxyServer) -> None:
    # A route missing from the map would be counted as "other", and a label value missing
    # from ENDPOINTS would have no series until its first request.
    assert set(ENDPOINT_BY_PATH.values()) <= set(ENDPOINTS)
    routes = {r.resource.canonical for r in proxy.app.router.routes() if r.resource is not None}
    assert routes == set(ENDPOINT_BY_PATH)


async def test_count_tokens_has_its_own_endpoint_label(proxy: ProxyServer) -> None:
    before = await scrape(proxy)
    assert metric(before, "dsml_proxy_requests_total", endpoint="messages_count_tokens",
                  status="200") == 0
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    async with client:
        counted = await client.messages.count_tokens(model="deepseek-v4", messages=MESSAGES)
    assert counted.input_tokens > 0
    s = await scrape(proxy)
    assert metric(s, "dsml_proxy_requests_total", endpoint="messages_count_tokens",
                  status="200") == 1
    assert metric(s, "dsml_proxy_request_duration_seconds_count",
                  endpoint="messages_count_tokens", stream="false") == 1
    for other in ("messages", "other"):
        assert metric(s, "dsml_proxy_requests_total", endpoint=other, status="200") == 0


async def test_no_created_series_and_no_global_switch(proxy: ProxyServer) -> None:
    client = proxy.client()
    await client.models.list()  # a counted request: its series have a creation time
    text = (await client._client.get(proxy.url + "/metrics")).text
    assert "dsml_proxy_requests_total{" in text
    assert "_created" not in text  # neither samples nor their HELP/TYPE lines
    # Dropped from this app's scrape only: prometheus-client's process-wide switch is left
    # alone, so another registry in the process (an embedding application's) keeps them.
    other = CollectorRegistry()
    Counter("embedding_app_events", "An embedding application's counter", registry=other).inc()
    assert "embedding_app_events_created" in generate_latest(other).decode()
