"""Issue 12 item 3 on the embedded engine: the sampling fields are computed by its sampler
and logprobs come from its logits, through the real server and the openai SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

pytest.importorskip("torch")

import openai
import torch
from aiohttp import web

from dsml.tokenizer import load_tokenizer
from engine.config import ModelConfig
from engine.model import Transformer
from engine.runtime import Engine
from proxy.app import create_app, make_runner
from proxy.backends.embedded import EmbeddedBackend
from proxy.settings import Settings

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def backend() -> EmbeddedBackend:
    model = Transformer(ModelConfig.tiny(), dtype=torch.float32).init_random_(3)
    return EmbeddedBackend(Engine(model, load_tokenizer(), "cpu"))


@pytest.fixture
async def client(backend: EmbeddedBackend) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(backend, Settings(log_requests=False))
    app.cleanup_ctx.clear()  # the module's engine outlives each test's app
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as c:
        yield c
    await runner.cleanup()


def plain_tokens(n: int) -> list[int]:
    """Token ids whose text is a plain word (no markup the parser would act on)."""
    tok = load_tokenizer()
    out = [t for t in range(3000, 6000) if tok.decode([t]).strip().isalpha()
           and tok.decode([t]).isascii()]
    return out[:n]


async def test_logprobs_from_the_engines_logits(client: openai.AsyncOpenAI) -> None:
    kwargs = {"model": "deepseek-chat", "messages": MESSAGES, "max_tokens": 6,
              "temperature": 0, "logprobs": True, "top_logprobs": 3}
    plain = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(**kwargs, stream=True)
    streamed = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    entries = plain.choices[0].logprobs.content
    assert entries, plain
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy, no penalty: the sampled token is the model's most likely one.
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


async def test_bias_and_repetition_penalty_reach_the_sampler(client: openai.AsyncOpenAI) -> None:
    a, b = plain_tokens(2)
    tok = load_tokenizer()
    # The bias swamps the random model's logits (a few units): greedy writes `a` only.
    bias = {str(a): 100.0, str(b): 90.0}
    kwargs = {"model": "deepseek-chat", "messages": MESSAGES, "max_tokens": 3,
              "temperature": 0, "logit_bias": bias}
    biased = await client.chat.completions.create(**kwargs)
    assert biased.choices[0].message.content == tok.decode([a, a, a])
    # Repetition penalty 10: once `a` is written its ~100 becomes ~10, below `b`'s ~90.
    penalized = await client.chat.completions.create(
        **kwargs, extra_body={"repetition_penalty": 10.0})
    assert penalized.choices[0].message.content.startswith(tok.decode([a, b]))
