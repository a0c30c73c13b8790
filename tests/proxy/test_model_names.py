"""Issue 12 item 2: the engine's own model ids are served, refreshed, and listed after the
default (thinking-on) name; other names are a 404."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from proxy import models as models_module
from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import StartProxy

MESSAGES = [{"role": "user", "content": "hi"}]
ENGINE_ID = "deepseek-ai/DeepSeek-V4-Flash"


async def test_engine_model_name_works_through_the_sdk(start_proxy: StartProxy,
                                                       fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    client = proxy.client()
    fake.push("hmm</think>ok<｜end▁of▁sentence｜>")
    resp = await client.chat.completions.create(model=ENGINE_ID, messages=MESSAGES)
    assert resp.choices[0].message.content == "ok"
    assert resp.model == ENGINE_ID
    # The engine's id means the server default: thinking on.
    assert fake.prompt_text().endswith("<｜Assistant｜><think>")
    assert fake.requests[0]["model"] == ENGINE_ID
    assert (await client.models.retrieve(ENGINE_ID)).id == ENGINE_ID
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert ENGINE_ID in info.value.response.json()["error"]["message"]


async def test_models_lists_default_first_then_engine_ids(start_proxy: StartProxy,
                                                          fake: FakeUpstream) -> None:
    fake.model_ids = [ENGINE_ID, "v4-alias"]
    proxy = await start_proxy(model_name="deepseek-v4",
                              models=[{"name": "deepseek-v3.2", "dialect": "v3.2"}])
    ids = [m.id for m in (await proxy.client().models.list()).data]
    assert ids[0] == "deepseek-v4"
    assert set(ids) == {"deepseek-v4", ENGINE_ID, "v4-alias", "deepseek-v3.2",
                        "deepseek-chat", "deepseek-reasoner"}
    assert len(ids) == len(set(ids))


async def test_thinking_off_default_lists_reasoner_first(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(model_name="v4", default_thinking=False)
    ids = [m.id for m in (await proxy.client().models.list()).data]
    assert ids[0] == "deepseek-reasoner" and "v4" in ids


async def test_engine_ids_refresh_on_ready(start_proxy: StartProxy, fake: FakeUpstream,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_module, "REFRESH_INTERVAL_S", 3600.0)  # only /ready refreshes
    proxy = await start_proxy()
    client = proxy.client()
    fake.model_ids = ["renamed-v4"]
    with pytest.raises(openai.NotFoundError):  # unknown name: one refresh, then rate limited
        await client.models.retrieve("not-yet")
    assert ENGINE_ID not in [m.id for m in (await client.models.list()).data]
    fake.model_ids = ["renamed-v4", "later-v4"]
    with pytest.raises(openai.NotFoundError):  # the interval has not passed: no refresh
        await client.models.retrieve("later-v4")
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/ready") as resp:
        assert resp.status == 200
    assert (await client.models.retrieve("later-v4")).id == "later-v4"


async def test_engine_loading_at_start_is_asked_again(start_proxy: StartProxy,
                                                      fake: FakeUpstream) -> None:
    fake.models_status = 503  # still loading: lists nothing
    proxy = await start_proxy()
    fake.models_status = 200
    fake.push("</think>ok<｜end▁of▁sentence｜>")
    resp = await proxy.client().chat.completions.create(model=ENGINE_ID, messages=MESSAGES)
    assert resp.choices[0].message.content == "ok"  # the unknown name asked once more


async def test_models_list_asks_an_engine_that_was_loading(start_proxy: StartProxy,
                                                           fake: FakeUpstream) -> None:
    fake.models_status = 503
    proxy = await start_proxy()
    fake.models_status = 200
    ids = [m.id for m in (await proxy.client().models.list()).data]
    assert ENGINE_ID in ids


async def test_model_sent_upstream_is_learned_after_loading(start_proxy: StartProxy,
                                                            fake: FakeUpstream) -> None:
    """An engine still loading at start (503) is asked for its model again on first use:
    vLLM and SGLang want the served name in `model`."""
    fake.models_status = 503
    proxy = await start_proxy()
    fake.models_status = 200
    fake.push("ok<｜end▁of▁sentence｜>")
    await proxy.client().chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert fake.requests[0]["model"] == ENGINE_ID
