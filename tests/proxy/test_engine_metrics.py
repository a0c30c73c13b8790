"""Issue 17's engine metrics (`dsml_proxy_engine_*`) through the real server and the openai
SDK, on the tiny random model with the embedded engine's fast path (where the prefix cache
lives): exported from the first scrape, and a follow-up turn counted as a prefix-cache hit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

pytest.importorskip("torch")

import aiohttp
import openai
import torch
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from dsml.tokenizer import load_tokenizer
from engine.config import ModelConfig
from engine.model import Transformer
from engine.runtime import Engine
from proxy.app import create_app, make_runner
from proxy.backends.embedded import EmbeddedBackend
from proxy.metrics import ENGINE_COUNTERS, ENGINE_GAUGES
from proxy.settings import Settings


@pytest.fixture(scope="module")
def backend() -> EmbeddedBackend:
    model = Transformer(ModelConfig.tiny(), dtype=torch.float32).init_random_(3)
    return EmbeddedBackend(Engine(model, load_tokenizer(), "cpu", max_seq_len=512,
                                  max_batch_size=2, engine_path="fast"))


@pytest.fixture
async def server(backend: EmbeddedBackend) -> AsyncIterator[str]:
    app = create_app(backend, Settings(log_requests=False))
    app.cleanup_ctx.clear()  # the module's engine outlives each test's app
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def _scrape(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("dsml_proxy_engine_")}


async def test_engine_metrics_count_a_follow_up_turn_as_a_prefix_cache_hit(server: str) -> None:
    before = await _scrape(server)
    names = {"dsml_proxy_engine_" + n for n, _ in ENGINE_GAUGES.values()}
    names |= {"dsml_proxy_engine_" + n + "_total" for n, _ in ENGINE_COUNTERS.values()}
    assert names <= set(before)  # every series from the first scrape
    assert before["dsml_proxy_engine_slots_total"] == 2
    assert before["dsml_proxy_engine_prefix_cache_hits_total"] == 0

    messages = [{"role": "user", "content": "Say something about the weather in Paris, the city of light, "
                 "in spring, in summer and in the autumn, for a long trip."}]
    async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0,
                                  timeout=60) as client:
        # max_tokens=1: the one sampled token is never fed, so what stays cached is exactly
        # the first prompt, which the second (non-thinking) prompt starts with
        kwargs = {"model": "deepseek-chat", "max_tokens": 1, "temperature": 0}
        first = await client.chat.completions.create(messages=messages, **kwargs)
        reply = first.choices[0].message.content or ""
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "And in Rome?"}]
        second = await client.chat.completions.create(messages=messages, **kwargs)
    after = await _scrape(server)
    assert after["dsml_proxy_engine_requests_total"] == 2
    assert after["dsml_proxy_engine_prefix_cache_misses_total"] == 1
    assert after["dsml_proxy_engine_prefix_cache_hits_total"] == 1
    saved = first.usage.prompt_tokens
    assert after["dsml_proxy_engine_prefix_cache_saved_tokens_total"] == saved
    assert after["dsml_proxy_engine_prompt_tokens_total"] == saved + second.usage.prompt_tokens
    assert after["dsml_proxy_engine_prefill_tokens_total"] == second.usage.prompt_tokens
    assert after["dsml_proxy_engine_generated_tokens_total"] == 2
    assert after["dsml_proxy_engine_slots_used"] == 0
    assert after["dsml_proxy_engine_slots_cached"] == 1
    assert after["dsml_proxy_engine_running_sequences"] == 0


def test_the_prefix_cache_setting_reaches_the_engine(tmp_path, monkeypatch) -> None:
    from proxy.cli import make_backend, settings_from_args

    monkeypatch.delenv("DSML_PROXY_PREFIX_CACHE", raising=False)
    assert settings_from_args(["serve"]).prefix_cache is True
    monkeypatch.setenv("DSML_PROXY_PREFIX_CACHE", "false")
    assert settings_from_args(["serve"]).prefix_cache is False
    monkeypatch.delenv("DSML_PROXY_PREFIX_CACHE")
    args = ["serve", "--demo", "--device", "cpu", "--engine-path", "fast"]
    for flag, on in (("--no-prefix-cache", False), ("--prefix-cache", True)):
        settings = settings_from_args([*args, flag]).model_copy(update={"demo_dir": tmp_path})
        backend = make_backend(settings)
        try:
            assert backend.engine.prefix_cache is on
        finally:
            backend.engine.close()
