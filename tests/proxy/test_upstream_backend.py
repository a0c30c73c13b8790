"""The upstream backend on its own, against the fake engine: bodies per kind, SSE, failures."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from proxy.backends.base import Backend, BackendError, GenerateRequest, SamplingParams
from proxy.backends.upstream import UpstreamBackend
from proxy.settings import UpstreamKind
from tests.fakes.upstream import FakeUpstream, Reply, refused_url

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
