"""The upstream reader merges the events of one read into few deltas: nothing downstream may
change because of it (text, tool calls, token counts, reasoning tokens, finish), however the
engine's bytes are cut into reads."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

import dsml
from dsml.events import ContentDelta, ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from proxy.backends.base import BackendError, GenerateDelta, GenerateRequest, SamplingParams
from proxy.backends.upstream import SseReader, UpstreamBackend
from proxy.metrics import Metrics
from proxy.reasoning_cache import ReasoningCache
from proxy.timing import RequestClock
from proxy.turn import TurnRunner
from tests.fakes.upstream import FakeUpstream, Reply, serve_completions
from tests.proxy.conftest import load_cases

CASES = load_cases("parse.jsonl")
# A thinking turn with reasoning, an answer and two tool calls (short: every offset is run).
THINKING_CASE = min((c for c in CASES.values()
                     if c["thinking"] and len(c["expected"]["tool_calls"]) >= 2
                     and c["completion"].index("</think>") > 20),
                    key=lambda c: len(c["completion"]))
REQ = GenerateRequest(prompt_ids=[0], prompt_text=None, sampling=SamplingParams())


def record(completion: str, *, sep: bytes = b"\n\n", comments: bool = False) -> bytes:
    """The SSE bytes the fake engine (vLLM's format) sends for `completion`, usage included."""
    fake = FakeUpstream()
    events, finish, matched = fake._plan(Reply(completion), {"stream": True})
    out = []
    for k, (text, _) in enumerate(events):
        last = k == len(events) - 1
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": finish if last else None,
                  "stop_reason": matched if last else None}
        if comments and k % 5 == 0:
            out.append(b": keep-alive" + sep)
        out.append(b"data: " + json.dumps({"choices": [choice]}).encode() + sep)
    usage = {"prompt_tokens": 1, "completion_tokens": sum(n for _, n in events)}
    out.append(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + sep)
    out.append(b"data: [DONE]" + sep)
    return b"".join(out)


def read(reads: list[bytes]) -> list[GenerateDelta]:
    reader, out = SseReader(), []
    for chunk in reads:
        reader.feed(chunk, out)
    reader.end(out)
    assert reader.done
    return out


def fields(deltas: list[GenerateDelta]) -> list[tuple[Any, ...]]:
    return [(d.text, d.num_tokens, d.finish_reason, d.stop_reason) for d in deltas]


def per_event(raw: bytes) -> list[GenerateDelta]:
    """The reference: one read per event, as the reader gets from a slow engine."""
    sep = b"\r\n\r\n" if b"\r\n" in raw else b"\n\n"
    return read([event + sep for event in raw.split(sep) if event])


class ScriptedBackend:
    name = "scripted"

    def __init__(self, deltas: list[GenerateDelta]) -> None:
        self.deltas = deltas

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        for delta in self.deltas:
            yield delta

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


_PARTS: dict[Any, Any] = {}


def turn_result(case: dict[str, Any], deltas: list[GenerateDelta], *,
                parallel_tool_calls: bool = True) -> tuple[Any, ...]:
    return asyncio.run(run_turn(case, deltas, parallel_tool_calls=parallel_tool_calls))


async def run_turn(case: dict[str, Any], deltas: list[GenerateDelta], *,
                   parallel_tool_calls: bool = True) -> tuple[Any, ...]:
    """Everything a client sees of a real turn fed with `deltas` (call ids aside)."""
    if not _PARTS:
        _PARTS["tok"] = dsml.load_tokenizer()
        _PARTS["metrics"] = Metrics(version="t", dialect="v4", backend="scripted")
    prompt = _PARTS.get(case["id"])
    if prompt is None:
        prompt = _PARTS[case["id"]] = dsml.render_chat(
            {"messages": [{"role": "user", "content": "go"}], "tools": case["tools"]},
            default_thinking=case["thinking"])
    runner = TurnRunner(ScriptedBackend(deltas), _PARTS["tok"], _PARTS["metrics"],
                        reasoning_cache=ReasoningCache(16))
    turn = runner.start(prompt, SamplingParams(), endpoint="chat_completions",
                        clock=RequestClock(), parallel_tool_calls=parallel_tool_calls)
    content, reasoning, names, args = [], [], [], {}
    async for event in turn.events():
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            names.append((event.index, event.name))
        elif isinstance(event, ToolCallArgsDelta):
            args[event.index] = args.get(event.index, "") + event.fragment
    result = turn.result
    assert result is not None
    return ("".join(content), "".join(reasoning), names, args, result.content,
            result.reasoning_content, [(c.name, c.arguments_json) for c in result.tool_calls],
            result.turn_outcome, turn.finish_reason, turn.completion_tokens,
            turn.reasoning_tokens)


def summary(deltas: list[GenerateDelta]) -> tuple[Any, ...]:
    finishing = [(d.finish_reason, d.stop_reason) for d in deltas if d.finish_reason]
    return "".join(d.text for d in deltas), sum(d.num_tokens for d in deltas), finishing


def test_a_read_of_many_events_gives_one_delta() -> None:
    no_think = min((c for c in CASES.values() if not c["thinking"] and c["expected"]["tool_calls"]
                    and len(per_event(record(c["completion"]))) > 105),
                   key=lambda c: len(c["completion"]))
    raw = record(no_think["completion"])
    reference = per_event(raw)
    events = [e + b"\n\n" for e in raw.split(b"\n\n") if e]
    reader, out = SseReader(), []
    reader.feed(events[0], out)
    assert fields(out) == fields(reference[:1])  # the first token
    out.clear()
    # After the first token, a read's events go out 4, then 16, then up to 64 at a time.
    reader.feed(b"".join(events[1:41]), out)
    assert [d.num_tokens for d in out] == [len(d.parts) for d in out] == [4, 16, 20]
    assert "".join(d.text for d in out) == "".join(d.text for d in reference[1:41])
    out.clear()
    reader.feed(b"".join(events[41:101]), out)
    assert len(out) == 1 and out[0].num_tokens == 60 and len(out[0].parts) == 60
    assert out[0].text == "".join(out[0].parts) == "".join(d.text for d in reference[41:101])


def test_the_first_token_goes_out_before_the_rest_of_its_read_is_decoded() -> None:
    """push() only splits; each take() decodes the next events: the first token alone."""
    raw = record(THINKING_CASE["completion"])
    reference = per_event(raw)
    reader, out = SseReader(), []
    reader.push(raw)
    assert out == [] and reader.pending and reader.num_counted == 0
    reader.take(out)
    assert fields(out) == fields(reference[:1]) and reader.num_counted == 1 and reader.pending
    reader.take(out)
    assert sum(d.num_tokens for d in out) == 5  # then 4 events
    while reader.pending:
        reader.take(out)
    assert reader.done and summary(out) == summary(reference)


def test_where_a_merged_delta_ends() -> None:
    raw = record(THINKING_CASE["completion"])
    reference = per_event(raw)
    merged = read([raw])  # the whole stream in one read
    assert len(reference) > 30
    assert merged[0].num_tokens == 1 and merged[0].text == reference[0].text  # first token alone
    think_ends = [k for k, d in enumerate(merged) if "</think>" in d.text]
    assert len(think_ends) == 1 and merged[think_ends[0]].text.endswith("</think>")
    assert all(len(d.parts) <= 64 for d in merged)
    assert len(merged) <= 5 + len(reference) // 64
    assert "".join(d.text for d in merged) == "".join(d.text for d in reference)
    assert sum(d.num_tokens for d in merged) == sum(d.num_tokens for d in reference)
    assert (merged[-1].finish_reason, merged[-1].stop_reason) == ("stop", None)
    no_think = next(c for c in CASES.values() if not c["thinking"])
    events = [e + b"\n\n" for e in record(no_think["completion"]).split(b"\n\n") if e]
    long = events[:-2] * 8  # text events only, 8 times over
    reader, out = SseReader(max_merge=50), []
    reader.feed(b"".join(long), out)
    sizes = [len(d.parts) for d in out]
    assert sizes[:3] == [1, 4, 16] and set(sizes[3:-1]) == {50} and 1 <= sizes[-1] <= 50
    assert sum(sizes) == len(long)


async def test_every_byte_offset_gives_the_same_turn() -> None:
    case = THINKING_CASE
    raw = record(case["completion"])
    expected = await run_turn(case, per_event(raw))
    assert expected[6] and expected[10] > 0  # tool calls and reasoning tokens
    assert expected == await run_turn(case, read([raw]))
    for cut in range(1, len(raw)):
        assert await run_turn(case, read([raw[:cut], raw[cut:]])) == expected, cut


@pytest.mark.parametrize("parallel_tool_calls", [True, False])
def test_random_reads_give_the_same_turn(parallel_tool_calls: bool) -> None:
    rng = random.Random(3)
    cases = [c for c in CASES.values() if c["expected"]["tool_calls"]]
    for case in rng.sample(cases, 25):
        raw = record(case["completion"])
        expected = turn_result(case, per_event(raw), parallel_tool_calls=parallel_tool_calls)
        for _ in range(4):
            cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 12)))
            reads = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            assert turn_result(case, read(reads),
                               parallel_tool_calls=parallel_tool_calls) == expected, case["id"]
        byte_reads = [raw[k:k + 1] for k in range(len(raw))]
        assert turn_result(case, read(byte_reads),
                           parallel_tool_calls=parallel_tool_calls) == expected


@pytest.mark.parametrize("sep", [b"\r\n\r\n", b"\r\r", b"\n\n"])
def test_crlf_separators_and_comment_lines(sep: bytes) -> None:
    plain = read([record(THINKING_CASE["completion"])])
    raw = record(THINKING_CASE["completion"], sep=sep, comments=True)
    assert b": keep-alive" in raw
    for cut in range(1, len(raw), 7):  # "\r" | "\n" across reads included
        assert summary(read([raw[:cut], raw[cut:]])) == summary(plain)
    assert [d.text for d in read([raw[k:k + 1] for k in range(len(raw))])] == [
        d.text for d in per_event(record(THINKING_CASE["completion"]))]


def test_multiline_data_and_other_fields() -> None:
    raw = (b"event: message\nid: 1\ndata: {\"choices\":\ndata: [{\"text\": \"a\"}]}\n\n"
           b"data:{\"choices\":[{\"text\":\"b\",\"finish_reason\":\"length\"}]}\n\n"
           b"data: [DONE]\n\ndata: {\"choices\":[{\"text\":\"ignored\"}]}\n\n")
    assert fields(read([raw])) == [("a", 1, None, None), ("b", 1, "length", None)]


def test_a_last_event_without_a_blank_line_counts() -> None:
    raw = b'data: {"choices":[{"text":"x","finish_reason":"stop"}]}\n'
    reader, out = SseReader(), []
    reader.feed(raw, out)
    assert out == []
    reader.end(out)
    assert fields(out) == [("x", 1, "stop", None)] and not reader.done


@pytest.mark.parametrize("bad", [b"data: {not json}\n\n", b'data: {"error": {"message": "oom"}}\n\n',
                                 b"data: [1, 2]\n\n", b"data: \xff\xfe\n\n"])
def test_a_bad_event_after_good_ones_in_one_read(bad: bytes) -> None:
    good = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
    reader, out = SseReader(), []
    with pytest.raises((ValueError, BackendError, AttributeError, TypeError)):
        reader.feed(good + bad + b'data: {"choices":[{"text":"c"}]}\n\n', out)
    # What came before the bad event (the first token goes out alone, as always).
    assert fields(out) == [("a", 1, None, None), ("b", 1, None, None)]


async def serve_bytes(reads: list[bytes], *,
                      then_close: bool = False) -> tuple[web.AppRunner, str]:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in reads:
            await response.write(chunk)
            await asyncio.sleep(0.01)  # separate reads
        if then_close:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    return await serve_completions(completions)


@pytest.mark.parametrize(("reads", "close", "reason", "text"), [
    ([b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"te'], True, "stream", "a"),
    ([b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n',
      b"data: {oops}\n\n"], False, "stream", "ab"),
    ([b'data: {"choices":[{"text":"a"}]}\n\ndata: {"error":{"message":"engine died"}}\n\n'],
     False, "stream", "a"),
    ([b'data: {"choices":[{"text":"a"}]}\n\n'], False, "stream", "a"),  # no finish, no [DONE]
])
async def test_errors_mid_stream_are_still_classified(
        reads: list[bytes], close: bool, reason: str, text: str) -> None:
    runner, url = await serve_bytes(reads, then_close=close)
    backend = UpstreamBackend(url, model="m")
    got = []
    try:
        with pytest.raises(BackendError) as info:
            async for delta in backend.generate(REQ):
                got.append(delta.text)
        assert info.value.reason == reason
        assert "".join(got) == text
    finally:
        await backend.close()
        await runner.cleanup()


async def test_split_reads_through_a_real_connection() -> None:
    raw = record(THINKING_CASE["completion"], sep=b"\r\n\r\n", comments=True)
    for cut in (1, 5, len(raw) // 3, len(raw) - 3):
        runner, url = await serve_bytes([raw[:cut], raw[cut:]])
        backend = UpstreamBackend(url, model="m")
        try:
            deltas = [d async for d in backend.generate(REQ)]
        finally:
            await backend.close()
            await runner.cleanup()
        assert "".join(d.text for d in deltas) == "".join(d.text for d in per_event(raw))
        assert sum(d.num_tokens for d in deltas) == sum(d.num_tokens for d in per_event(raw))
        assert deltas[-1].finish_reason == "stop"


def test_odd_event_layouts_cut_anywhere() -> None:
    """Comments, other fields, multi-line data, empty events and line-ending styles mixed in
    one stream, cut at random: the same text, tokens and finish as one read per event."""
    rng = random.Random(11)
    for _ in range(40):
        sep = rng.choice([b"\n", b"\r\n", b"\r"])
        texts = [rng.choice(["a", "bc", " ", "</think>", "\u00e9", "x\ny"])
                 for _ in range(rng.randint(1, 90))]
        events = []
        for k, text in enumerate(texts):
            payload = json.dumps({"choices": [{"text": text, "finish_reason":
                                               "stop" if k == len(texts) - 1 else None}]})
            kind = rng.random()
            if kind < 0.1:
                events.append(b": ping" + sep + b"data: " + payload.encode())
            elif kind < 0.2:
                events.append(b"event: message" + sep + b"id: 3" + sep + b"data:" + payload.encode())
            elif kind < 0.3:
                cut = payload.index("[")  # between two JSON tokens: joined by "\n"
                head, tail = payload[:cut], payload[cut:]
                events.append(b"data: " + head.encode() + sep + b"data: " + tail.encode())
            else:
                events.append(b"data: " + payload.encode())
            if rng.random() < 0.1:
                events.append(b"")  # an empty event: two blank lines in a row
        events.append(b"data: [DONE]")
        raw = b"".join(e + sep + sep for e in events)
        reference = read([e + sep + sep for e in events])
        assert "".join(d.text for d in reference) == "".join(texts)
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 8)))
            reads = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            assert summary(read(reads)) == summary(reference)
        assert summary(read([raw])) == summary(reference)
