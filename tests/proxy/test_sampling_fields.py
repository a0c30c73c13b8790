"""Issue 12 item 3: sampling fields reach the engine in its own spelling, or are a 400 naming
the field; logprobs come back for the visible content tokens only, streamed and not."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, fake_logprob
from tests.proxy.conftest import StartProxy

MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]
CALL = ("Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
SAMPLING: dict[str, Any] = {"frequency_penalty": 0.5, "presence_penalty": -0.25, "seed": 7,
                            "logit_bias": {"100": 5.0, "2048": -100.0}}
EXTRA = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}  # vLLM's, via extra_body


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llamacpp"])
async def test_each_engine_gets_its_spelling(start_proxy: StartProxy, fake: FakeUpstream,
                                             kind: str) -> None:
    proxy = await start_proxy(upstream_kind=kind)
    fake.push("</think>ok<｜end▁of▁sentence｜>")
    await proxy.client().chat.completions.create(
        model="deepseek-reasoner", messages=MESSAGES, logprobs=True, top_logprobs=0,
        extra_body=EXTRA, **SAMPLING)
    sent = fake.requests[0]
    for key in ("frequency_penalty", "presence_penalty", "seed", "top_k", "min_p"):
        assert sent[key] == {**SAMPLING, **EXTRA}[key], key
    if kind == "llamacpp":
        assert sent["repeat_penalty"] == 1.1 and "repetition_penalty" not in sent
        assert sent["logit_bias"] == [[100, 5.0], [2048, -100.0]]  # [[id, bias]] pairs
        assert sent["n_probs"] == 1 and "logprobs" not in sent  # n_probs 0 would mean none
    else:
        assert sent["repetition_penalty"] == 1.1
        assert sent["logit_bias"] == {"100": 5.0, "2048": -100.0}
        assert sent["logprobs"] == 0  # the legacy completions form: top N


async def test_ds4_refuses_what_it_cannot_do(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(upstream_kind="ds4")
    client = proxy.client()
    for field, value in [("frequency_penalty", 0.5), ("presence_penalty", 0.5),
                         ("logit_bias", {"5": 1.0}), ("logprobs", True),
                         ("repetition_penalty", 1.2)]:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES,
                                                 extra_body={field: value})
        err = info.value.response.json()["error"]
        assert err["param"] == field and "upstream:ds4" in err["message"], err
    assert fake.requests == []  # refused before anything reached the engine
    fake.push("ok<｜end▁of▁sentence｜>")
    await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES, seed=3,
                                         extra_body={"top_k": 5, "min_p": 0.1})
    assert (fake.requests[0]["seed"], fake.requests[0]["top_k"],
            fake.requests[0]["min_p"]) == (3, 5, 0.1)


async def test_bad_sampling_values_are_400(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    client = (await start_proxy()).client()
    for extra in ({"logit_bias": {"hello": 1}}, {"logit_bias": {"5": 101}},
                  {"logit_bias": {"999999999": 1}}, {"top_logprobs": 3},
                  {"logprobs": True, "top_logprobs": 21}, {"frequency_penalty": 3}):
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES,
                                                 extra_body=extra)
    assert fake.requests == []


def content_tokens(fake: FakeUpstream, completion: str, content: str) -> list[tuple[str, float]]:
    """(token, logprob) the fake sends for the tokens `content` came from, a run of events
    right after `</think>` (the fake numbers its events: fake_logprob(k)). The last one may
    hold more than content (`.\n\n` is one token: its `.` is content, the rest markup)."""
    pieces = [text for text, _ in fake.pieces(completion)]
    start = next(k for k, t in enumerate(pieces) if "</think>" in t) + 1
    out, text = [], ""
    for k in range(start, len(pieces)):
        if len(text) >= len(content):
            break
        text += pieces[k]
        out.append((pieces[k], fake_logprob(k)))
    assert text.startswith(content)
    return out


@pytest.mark.parametrize("kind", ["vllm", "llamacpp"])
async def test_chat_logprobs_cover_content_only(start_proxy: StartProxy, fake: FakeUpstream,
                                                kind: str) -> None:
    proxy = await start_proxy(upstream_kind=kind)
    completion = "Need the weather.</think>" + CALL
    fake.push(completion, completion)
    client = proxy.client()
    kwargs: dict[str, Any] = {"model": "deepseek-reasoner", "messages": MESSAGES, "tools": TOOLS,
                              "logprobs": True, "top_logprobs": 2}
    plain = await client.chat.completions.create(**kwargs)
    async with client.chat.completions.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    expected = content_tokens(fake, completion, "Checking.")
    for choice in (plain.choices[0], final.choices[0]):
        assert choice.message.content == "Checking."
        assert choice.message.tool_calls and choice.finish_reason == "tool_calls"
        got = choice.logprobs.content
        # Reasoning, the blank line before the block, DSML markup and arguments: none.
        assert [(e.token, e.logprob) for e in got] == expected
        assert all(len(e.top_logprobs) == 2 for e in got)
        assert got[0].top_logprobs[0].token == got[0].token
        assert got[0].top_logprobs[1].token == "alt1"
        assert got[0].bytes == list(got[0].token.encode())


async def test_chat_stream_chunks_carry_logprobs(start_proxy: StartProxy,
                                                 fake: FakeUpstream) -> None:
    """Each content chunk carries its own tokens' logprobs (choices[].logprobs.content)."""
    proxy = await start_proxy()
    fake.push("</think>Hello there, world.<｜end▁of▁sentence｜>")
    stream = await proxy.client().chat.completions.create(
        model="deepseek-reasoner", messages=MESSAGES, logprobs=True, stream=True)
    seen = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                assert choice.logprobs is not None and choice.logprobs.content
                seen.append((choice.delta.content,
                             "".join(e.token for e in choice.logprobs.content)))
    assert "".join(text for text, _ in seen) == "Hello there, world."
    assert all(text == tokens for text, tokens in seen)


async def test_no_logprobs_unless_asked(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    fake.push("</think>Hi<｜end▁of▁sentence｜>")
    resp = await proxy.client().chat.completions.create(model="deepseek-reasoner",
                                                        messages=MESSAGES)
    assert resp.choices[0].logprobs is None and "logprobs" not in fake.requests[0]


async def test_responses_logprobs(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    completion = "Think.</think>Hello there.<｜end▁of▁sentence｜>"
    fake.push(completion, completion)
    client = proxy.client()
    kwargs: dict[str, Any] = {"model": "deepseek-reasoner", "input": "hi", "top_logprobs": 1,
                              "include": ["message.output_text.logprobs"]}
    plain = await client.responses.create(**kwargs)
    deltas: list[Any] = []
    async with client.responses.stream(**kwargs) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.extend(event.logprobs)
        final = await stream.get_final_response()
    expected = content_tokens(fake, completion, "Hello there.")
    assert [(e.token, e.logprob) for e in deltas] == expected
    for response in (plain, final):
        message = next(item for item in response.output if item.type == "message")
        part = message.content[0]
        assert part.text == "Hello there."
        assert [(e.token, e.logprob) for e in part.logprobs] == expected
        assert all(len(e.top_logprobs) == 1 for e in part.logprobs)
    assert fake.requests[0]["logprobs"] == 1


async def test_raw_completions_logprobs(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    fake.push("abc def<｜end▁of▁sentence｜>")
    resp = await proxy.client().completions.create(model="deepseek-chat", prompt="x",
                                                   logprobs=2, frequency_penalty=0.3)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text == "abc def"
    assert lp.token_logprobs == [fake_logprob(k) for k in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert fake.requests[0]["frequency_penalty"] == 0.3


async def test_anthropic_top_k_reaches_the_engine(start_proxy: StartProxy,
                                                  fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    fake.push("</think>ok<｜end▁of▁sentence｜>")
    async with aiohttp.ClientSession() as session, session.post(
            proxy.url + "/v1/messages", json={"model": "deepseek-reasoner", "max_tokens": 20,
                                               "top_k": 9, "messages": MESSAGES}) as resp:
        assert resp.status == 200
    assert fake.requests[0]["top_k"] == 9


async def test_refusal_is_a_400_on_streams_and_every_endpoint(start_proxy: StartProxy,
                                                             fake: FakeUpstream) -> None:
    """The refusal comes before the stream opens: an HTTP 400, not an SSE error event."""
    client = (await start_proxy(upstream_kind="ds4")).client()
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES,
                                             logprobs=True, stream=True)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        await client.responses.create(model="deepseek-chat", input="hi", stream=True,
                                      include=["message.output_text.logprobs"])
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        await client.completions.create(model="deepseek-chat", prompt="x", stream=True,
                                        frequency_penalty=1.0)
    assert fake.requests == []
