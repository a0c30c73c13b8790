"""The upstream backend on its own, against the fake engine: bodies per kind, SSE, failures."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing

import pytest
from aiohttp import web

from proxy.backends.base import Backend, BackendError, GenerateRequest, SamplingParams
from proxy.backends.upstream import UpstreamBackend
from proxy.settings import UpstreamKind
from tests.fakes.upstream import FakeUpstream, Reply, refused_url, serve_completions

REQ = GenerateRequest(prompt_ids=[0, 128803, 100, 128804, 128822], prompt_text="<p>",
                      sampling=SamplingParams(max_tokens=50, temperature=0.0, stop=["X"]))


@pytest.mark.parametrize(("kind", "ids", "special"), [
    (UpstreamKind.VLLM, True, True), (UpstreamKind.SGLANG, True, True),
    (UpstreamKind.LLAMACPP, False, False), (UpstreamKind.DS4, False, False)])
def test_body_per_kind(kind: UpstreamKind, ids: bool, special: bool) -> None:
    backend = UpstreamBackend("http://127.0.0.1:1", kind)
    assert isinstance(backend, Backend)
    body = backend.build_body(REQ)
    assert body["prompt"] == (REQ.prompt_ids if ids else REQ.prompt_text)
    assert ("skip_special_tokens" in body) is special
    assert body["stream"] is True and body["stop"] == ["X"] and body["max_tokens"] == 50
    assert "top_k" not in body  # unset options are left to the engine
    assert UpstreamBackend("http://x", kind, prompt_format="ids").build_body(REQ)["prompt"] == (
        REQ.prompt_ids)


async def collect(backend: UpstreamBackend, req: GenerateRequest = REQ) -> tuple[str, int, str]:
    text, num, finish = [], 0, None
    async for delta in backend.generate(req):
        text.append(delta.text)
        num += delta.num_tokens
        finish = delta.finish_reason or finish
    return "".join(text), num, finish


async def test_stream_text_and_token_count(fake: FakeUpstream) -> None:
    backend = UpstreamBackend(fake.url)
    completion = "Emoji 🙂🙂 and 北京 and <｜DSML｜tool_calls> end"
    fake.push(completion)
    try:
        text, num, finish = await collect(backend)
    finally:
        await backend.close()
    assert text == completion  # special tokens kept, characters never split
    assert num == len(fake.tokenizer.encode_generated(completion))  # the engine's usage count
    assert finish == "stop"


async def test_length_finish(fake: FakeUpstream) -> None:
    backend = UpstreamBackend(fake.url)
    fake.push("one two three four five six")
    req = GenerateRequest(prompt_ids=[0], prompt_text=None, sampling=SamplingParams(max_tokens=3))
    try:
        text, num, finish = await collect(backend, req)
    finally:
        await backend.close()
    assert (text, num, finish) == ("one two three", 3, "length")


@pytest.mark.parametrize(("reply", "reason"), [
    (Reply(status=503, text="overloaded"), "status"),
    (Reply("a b c d e f", close_after_tokens=2), "stream"),
    (Reply("late", delay_before_s=1.0), "timeout"),
])
async def test_failures_are_classified(fake: FakeUpstream, reply: Reply, reason: str) -> None:
    backend = UpstreamBackend(fake.url, read_timeout_s=0.2)
    fake.push(reply)
    try:
        with pytest.raises(BackendError) as info:
            await collect(backend)
    finally:
        await backend.close()
    assert info.value.reason == reason


async def test_connection_refused() -> None:
    backend = UpstreamBackend(refused_url())
    try:
        with pytest.raises(BackendError) as info:
            await collect(backend)
        assert info.value.reason == "connect"
        assert await backend.ready() is False
    finally:
        await backend.close()


async def test_aclose_drops_the_upstream_connection(fake: FakeUpstream) -> None:
    backend = UpstreamBackend(fake.url)
    fake.push(Reply("word " * 500, token_delay_s=0.02))
    try:
        async with aclosing(backend.generate(REQ)) as stream:
            await anext(stream)
        await asyncio.wait_for(fake.disconnected.wait(), 5)
    finally:
        await backend.close()


async def finish_of(backend: UpstreamBackend, req: GenerateRequest = REQ) -> tuple[str, str | None]:
    """(finish_reason, stop_reason) of the delta that finishes the stream."""
    finishing = [d async for d in backend.generate(req) if d.finish_reason is not None]
    assert len(finishing) == 1
    return finishing[0].finish_reason, finishing[0].stop_reason  # type: ignore[return-value]


@pytest.mark.parametrize(("completion", "stops", "max_tokens", "expected"), [
    ("alpha beta gamma delta", ["gamma", "beta"], None, ("stop", "beta")),  # earliest match
    ("alpha beta gamma delta", ["gamma"], None, ("stop", "gamma")),
    ("alpha beta<｜end▁of▁sentence｜>", ["gamma"], None, ("stop", None)),  # EOS: no string
    ("alpha beta gamma delta", ["delta"], 2, ("length", None)),
])
async def test_stop_reason_names_the_matched_stop_string(
        fake: FakeUpstream, completion: str, stops: list[str], max_tokens: int | None,
        expected: tuple[str, str | None]) -> None:
    backend = UpstreamBackend(fake.url)
    req = GenerateRequest(prompt_ids=[0], prompt_text=None,
                          sampling=SamplingParams(max_tokens=max_tokens, stop=stops))
    fake.push(completion)
    try:
        assert await finish_of(backend, req) == expected
    finally:
        await backend.close()


# The finishing choice as engines write it: vLLM `stop_reason` (string, stop token id or
# null), SGLang `matched_stop` (string, or a token id, EOS included), llama.cpp nothing.
@pytest.mark.parametrize(("fields", "expected"), [
    ({"stop_reason": "X"}, "X"),
    ({"stop_reason": 128803}, None),
    ({"stop_reason": None}, None),
    ({"matched_stop": "X"}, "X"),
    ({"matched_stop": 1}, None),
    ({}, None),
])
async def test_stop_reason_as_each_engine_spells_it(fields: dict, expected: str | None) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for choice in ({"index": 0, "text": "hi", "finish_reason": None},
                       {"index": 0, "text": "", "finish_reason": "stop", **fields}):
            await response.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    runner, url = await serve_completions(completions)
    backend = UpstreamBackend(url, model="m")
    try:
        assert await finish_of(backend) == ("stop", expected)
    finally:
        await backend.close()
        await runner.cleanup()


async def test_stop_reason_left_out_by_the_engine() -> None:
    async with FakeUpstream(report_stop_reason=False) as fake:
        backend = UpstreamBackend(fake.url)
        fake.push("alpha beta gamma")
        try:
            assert await finish_of(backend) == ("stop", None)
            req = GenerateRequest(prompt_ids=[0], prompt_text=None,
                                  sampling=SamplingParams(stop=["beta"]))
            fake.push("alpha beta gamma")
            assert await finish_of(backend, req) == ("stop", None)
        finally:
            await backend.close()


@pytest.mark.parametrize("kind", list(UpstreamKind))
def test_text_prompts_get_no_second_bos(kind: UpstreamKind) -> None:
    # Dialects without the V4 tokenizer send text only (proxy.turn.sends_ids); the rendered
    # text starts with BOS, which vLLM would otherwise add once more.
    text_only = GenerateRequest(prompt_ids=None, prompt_text="<p>", sampling=REQ.sampling)
    body = UpstreamBackend("http://x", kind).build_body(text_only)
    assert body["prompt"] == "<p>"
    assert body.get("add_special_tokens", True) is (kind is not UpstreamKind.VLLM)
    # With ids (vLLM's default) nothing is tokenized upstream: no field.
    assert "add_special_tokens" not in UpstreamBackend("http://x", kind).build_body(REQ)


@pytest.mark.parametrize("kind", list(UpstreamKind))
def test_the_body_on_the_wire_is_build_body(kind: UpstreamKind) -> None:
    """encode_body: build_body as JSON; prompt ids given as JSON text go in as they are."""
    backend = UpstreamBackend("http://x", kind)
    plain = GenerateRequest(prompt_ids=list(REQ.prompt_ids or []), prompt_text="<p>",
                            sampling=REQ.sampling)
    with_json = GenerateRequest(prompt_ids=plain.prompt_ids, prompt_text="<p>",
                                sampling=REQ.sampling,
                                prompt_ids_json=json.dumps(plain.prompt_ids))
    assert json.loads(backend.encode_body(plain)) == backend.build_body(plain)
    assert json.loads(backend.encode_body(with_json)) == backend.build_body(plain)
    text_only = GenerateRequest(prompt_ids=None, prompt_text="<p> ü", sampling=REQ.sampling)
    assert json.loads(backend.encode_body(text_only)) == backend.build_body(text_only)


async def test_a_finished_stream_leaves_its_connection_for_the_next() -> None:
    """After `data: [DONE]` the end of the body (here 50 ms later) is awaited beside the
    turn, and the connection goes back to the pool: the next requests open none. A body
    that does not end soon after [DONE] costs its connection, and nothing else."""
    tail_s = {"value": 0.05}
    peers: set[object] = set()  # connections the engine saw

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"text":"hi","finish_reason":"stop"}]}\n\n'
                             b"data: [DONE]\n\n")
        await asyncio.sleep(tail_s["value"])  # the end of the chunked body comes later
        await response.write_eof()
        return response

    runner, url = await serve_completions(completions)
    backend = UpstreamBackend(url, model="m")

    async def turn() -> None:
        assert await collect(backend) == ("hi", 1, "stop")  # at once, not 50 ms later
        for _ in range(200):
            if not backend._draining:
                break
            await asyncio.sleep(0.01)

    try:
        for _ in range(4):
            await turn()
        assert len(peers) == 1 and backend._client.connections_opened == 1
        tail_s["value"] = 0.5  # longer than the backend waits for it (0.1 s here)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("proxy.backends.upstream._DRAIN_TIMEOUT_S", 0.1)
            await turn()
            await turn()
        assert len(peers) == 2  # the first stuck connection was closed, not reused
        assert backend._client.connections_opened == 2
    finally:
        await backend.close()
        await runner.cleanup()


async def test_a_base_url_ending_in_v1_is_the_engine_root(fake: FakeUpstream) -> None:
    """`--upstream http://host:port/v1`, as OpenAI clients spell base URLs, reaches the same
    `/v1/completions` as the bare root (not `/v1/v1/completions`)."""
    backend = UpstreamBackend(fake.url + "/v1/")
    fake.push("hello")
    try:
        assert await collect(backend) == ("hello", 1, "stop")
        assert await backend.ready() is True
    finally:
        await backend.close()
