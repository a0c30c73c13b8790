"""Responses: reasoning summaries on request, and GET / DELETE / input_items over the store,
through the openai SDK (issue 12, item 5)."""

from __future__ import annotations

import openai
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import ProxyServer

EOS = "<｜end▁of▁sentence｜>"
THOUGHT = "The user greets me; I should greet back."
REPLY = THOUGHT + "</think>Hello!" + EOS


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_summary_is_the_reasoning_text_when_asked(
        proxy: ProxyServer, fake: FakeUpstream, stream: bool) -> None:
    client = proxy.client()
    deltas: list[str] = []

    async def respond(**kw: object) -> object:
        if not stream:
            return await client.responses.create(model="deepseek-reasoner", input="hi", **kw)
        async with client.responses.stream(model="deepseek-reasoner", input="hi", **kw) as s:
            async for event in s:
                if event.type == "response.reasoning_summary_text.delta":
                    deltas.append(event.delta)
            return await s.get_final_response()

    fake.push(REPLY)
    asked = await respond(reasoning={"effort": "high", "summary": "auto"})
    reasoning = asked.output[0]
    assert reasoning.type == "reasoning"
    assert [(p.type, p.text) for p in reasoning.summary] == [("summary_text", THOUGHT)]
    assert asked.reasoning.summary == "auto" and asked.output_text == "Hello!"
    if stream:
        assert "".join(deltas) == THOUGHT  # what Codex and pydantic-ai show while it streams
    deltas.clear()
    fake.push(REPLY)
    plain = await respond(reasoning={"effort": "high"})
    assert plain.output[0].type == "reasoning" and plain.output[0].summary == []
    assert deltas == []


async def test_retrieve_delete_and_input_items(proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    fake.push("Hello!" + EOS)
    items = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": "hi"},
             {"role": "user", "content": [{"type": "input_text", "text": "there"}]}]
    created = await client.responses.create(model="deepseek-chat", input=items)
    got = await client.responses.retrieve(created.id)
    assert got.model_dump() == created.model_dump()

    page = await client.responses.input_items.list(created.id)  # newest first, as OpenAI
    texts = [item.content[0].text for item in page.data]
    assert texts == ["there", "hi", "Be brief."]
    assert all(item.type == "message" and item.id for item in page.data)
    assert page.data[1].role == "user" and page.data[2].role == "developer"
    first = await client.responses.input_items.list(created.id, order="asc", limit=2)
    assert [i.content[0].text for i in first.data] == ["Be brief.", "hi"] and first.has_more
    rest = await client.responses.input_items.list(created.id, order="asc",
                                                   after=first.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["there"] and not rest.has_more

    # A streamed response is stored as the client received it, too.
    fake.push("Again!" + EOS)
    async with client.responses.stream(model="deepseek-chat", input="again",
                                       previous_response_id=created.id) as s:
        streamed = await s.get_final_response()
    again = await client.responses.retrieve(streamed.id)
    assert again.output_text == "Again!" and again.previous_response_id == created.id
    assert [i.content[0].text for i in
            (await client.responses.input_items.list(streamed.id)).data] == ["again"]

    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(created.id)
    with pytest.raises(openai.BadRequestError) as gone:  # nothing left to continue from
        await client.responses.create(model="deepseek-chat", input="more",
                                      previous_response_id=created.id)
    assert gone.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.responses.input_items.list(streamed.id, limit=500)


async def test_unstored_and_unknown_responses_are_404(
        proxy: ProxyServer, fake: FakeUpstream) -> None:
    client = proxy.client()
    fake.push("ok" + EOS)
    unstored = await client.responses.create(model="deepseek-chat", input="hi", store=False)
    for response_id in (unstored.id, "resp_nope"):
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.retrieve(response_id)
        assert missing.value.code == "response_not_found"
