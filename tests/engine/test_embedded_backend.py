"""The embedded backend behind the real proxy, driven by the `openai` SDK, on the tiny random
checkpoint. The random model writes nonsense: these tests check the plumbing (ids in, deltas
out, token counts, finish reasons, streaming, cancellation), not the words."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from dsml.tokenizer import load_tokenizer
from engine.make_checkpoint import write_checkpoint
from engine.runtime import default_device
from proxy.app import create_app, make_runner
from proxy.backends.base import Backend, GenerateRequest, SamplingParams
from proxy.backends.embedded import EmbeddedBackend
from proxy.errors import ApiError
from proxy.settings import Settings

PROMPT = [0, 128803, 5, 77, 128804]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)
    return EmbeddedBackend.from_checkpoint(path, device=default_device())


async def _deltas(backend, req):
    return [d async for d in backend.generate(req)]


async def test_protocol_and_deltas(backend):
    assert isinstance(backend, Backend) and backend.name == "embedded"
    assert await backend.ready()
    deltas = await _deltas(backend, GenerateRequest(
        prompt_ids=PROMPT, prompt_text=None, sampling=SamplingParams(max_tokens=3, temperature=0)))
    assert sum(d.num_tokens for d in deltas) <= 3
    assert deltas[-1].finish_reason in ("length", "stop")
    assert all(d.finish_reason is None for d in deltas[:-1])
    # The ids of each delta's tokens come along (a continued turn goes on from them).
    assert all(d.token_ids is not None and len(d.token_ids) == d.num_tokens for d in deltas)
    # Same prompt given as text: tokenized with control strings as their ids, same output.
    text = load_tokenizer().decode(PROMPT)
    again = await _deltas(backend, GenerateRequest(
        prompt_ids=None, prompt_text=text, sampling=SamplingParams(max_tokens=3, temperature=0)))
    assert [d.text for d in again] == [d.text for d in deltas]


def test_sampling_defaults(backend):
    s = backend.sampling_for(SamplingParams(), prompt_len=10)
    assert s.max_tokens == backend.engine.max_seq_len - 10
    assert (s.temperature, s.top_p, s.top_k, s.stop) == (1.0, 1.0, 0, ())
    s = backend.sampling_for(SamplingParams(max_tokens=5, temperature=0, top_k=7, seed=3,
                                            stop=["x"]), prompt_len=10)
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, s.stop) == (5, 0, 7, 3, ("x",))


async def test_prompt_over_the_context_is_a_400(backend):
    engine = backend.engine
    saved, engine.max_seq_len = engine.max_seq_len, len(PROMPT)
    try:
        with pytest.raises(ApiError) as info:
            await _deltas(backend, GenerateRequest(prompt_ids=PROMPT, prompt_text=None))
        assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
        with pytest.raises(ApiError, match="top_p"):
            engine.max_seq_len = saved
            await _deltas(backend, GenerateRequest(
                prompt_ids=PROMPT, prompt_text=None, sampling=SamplingParams(top_p=2.0)))
    finally:
        engine.max_seq_len = saved


async def test_cancel_mid_stream(backend):
    gen = backend.generate(GenerateRequest(
        prompt_ids=PROMPT, prompt_text=None, sampling=SamplingParams(max_tokens=500)))
    await anext(gen)
    await gen.aclose()
    # The engine is free for the next request at once.
    deltas = await asyncio.wait_for(_deltas(backend, GenerateRequest(
        prompt_ids=PROMPT, prompt_text=None, sampling=SamplingParams(max_tokens=1))), timeout=60)
    assert deltas[-1].finish_reason in ("length", "stop")


class _KeepOpen:
    """The module's backend outlives each app: the app's shutdown must not close it."""

    name = "embedded"

    def __init__(self, backend: EmbeddedBackend) -> None:
        self.generate, self.ready = backend.generate, backend.ready

    async def close(self) -> None:
        pass


@pytest.fixture
async def proxy_url(backend):
    settings = Settings(log_requests=False, model_name="deepseek-v4")
    app = create_app(_KeepOpen(backend), settings)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


async def test_chat_completion_end_to_end(proxy_url):
    import openai

    client = openai.AsyncOpenAI(base_url=proxy_url, api_key="unused", max_retries=0, timeout=120)
    resp = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 4
    assert resp.usage.prompt_tokens > 3

    # Two clients at once: the engine batches them; each gets its own complete answer.
    both = await asyncio.gather(*(client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": text}], max_tokens=2,
        temperature=0) for text in ("one", "two")))
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in both)

    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        stream=True, seed=1)
    finish = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finish[-1] in ("length", "stop")
    await client.close()
