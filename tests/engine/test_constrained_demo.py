"""The test that cannot be faked (issue 16): a model with random weights, behind the real
proxy with constrained decoding on, driven by the `openai` SDK, writes only calls that parse
and validate. Without the grammar the same random model writes no call at all.

The tiny random checkpoint's distribution is noise over the V4 vocabulary, so every call
that comes back whole and schema-valid is the grammar's doing. N is kept small for CI (each
call is ~110 tokens of DSML and values); DSML_PROXY_DEMO_N raises it (the issue's 200).
"""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
import pytest
from aiohttp import web

from engine.make_checkpoint import write_checkpoint
from engine.runtime import default_device
from proxy.app import create_app, make_runner
from proxy.backends.embedded import EmbeddedBackend
from proxy.settings import Settings

pytestmark = pytest.mark.slow

N = int(os.environ.get("DSML_PROXY_DEMO_N", "6"))
# Strings, integers, enums, arrays and a nested object, each bounded: a random model must
# be able to finish a value (an unbounded string would run to max_tokens).
PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6},
    "days": {"type": "integer", "minimum": 1, "maximum": 30},
    "mode": {"type": "string", "enum": ["train", "plane", "car"]},
    "stops": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "budget": {"type": "object", "properties": {
        "amount": {"type": "integer", "minimum": 0, "maximum": 10000},
        "currency": {"type": "string", "enum": ["EUR", "USD"]}},
        "required": ["amount", "currency"], "additionalProperties": False}},
    "required": ["city", "days", "mode", "budget"]}
TOOLS = [{"type": "function", "function": {"name": "plan_trip", "parameters": PARAMS}}]
MESSAGES = [{"role": "user", "content": "Plan a trip."}]


class _KeepOpen:
    name = "embedded"

    def __init__(self, backend: EmbeddedBackend) -> None:
        self.generate, self.ready = backend.generate, backend.ready

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)
    return EmbeddedBackend.from_checkpoint(path, device=default_device())


async def _client(backend, mode: str):
    import openai

    app = create_app(_KeepOpen(backend), Settings(log_requests=False, constrained_decoding=mode))
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600), runner


def _valid_calls(message) -> list[dict]:
    calls = []
    for call in message.tool_calls or []:
        assert call.function.name == "plan_trip"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS)
        calls.append(args)
    return calls


async def test_random_model_writes_only_valid_calls(backend) -> None:
    client, runner = await _client(backend, "all")
    try:
        required, auto, thinking = await asyncio.gather(
            asyncio.gather(*(client.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                seed=seed, max_tokens=400) for seed in range(N))),
            asyncio.gather(*(client.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, tools=TOOLS, seed=100 + seed,
                max_tokens=24) for seed in range(N // 2))),
            asyncio.gather(*(client.chat.completions.create(
                model="deepseek-reasoner", messages=MESSAGES, tools=TOOLS, seed=200 + seed,
                max_tokens=24) for seed in range(N // 2))))
    finally:
        await client.close()
        await runner.cleanup()
    for reply in required:  # every one a whole, schema-valid call
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert _valid_calls(choice.message)
        assert "DSML" not in (choice.message.content or "")
    for reply in auto:  # a clean answer (cut by max_tokens is still clean) or valid calls
        message = reply.choices[0].message
        _valid_calls(message)
        assert "DSML" not in (message.content or "")
    for reply in thinking:  # reasoning never holds DSML
        message = reply.choices[0].message
        _valid_calls(message)
        reasoning = getattr(message, "reasoning_content", None) or ""
        assert "DSML" not in reasoning and "DSML" not in (message.content or "")


async def test_without_the_grammar_the_random_model_writes_no_call(backend) -> None:
    """The control: the same requests unconstrained give no valid call."""
    client, runner = await _client(backend, "off")
    try:
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, tools=TOOLS, tool_choice="required",
            seed=seed, max_tokens=40) for seed in range(1)))
    finally:
        await client.close()
        await runner.cleanup()
    for reply in replies:
        message = reply.choices[0].message
        valid = 0
        for call in message.tool_calls or []:
            try:
                jsonschema.validate(json.loads(call.function.arguments), PARAMS)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                pass
        assert valid == 0
