"""The README's recipes, followed as a new user would: the `dsml-proxy serve` console script,
the anthropic SDK configured only by ANTHROPIC_BASE_URL / ANTHROPIC_AUTH_TOKEN (what Claude
Code reads), the openai SDK at `<server>/v1` with `responses` (what a Codex provider with
`wire_api = "responses"` calls). With a fixed signing secret, thinking replayed after a
restart is still trusted (the reasoning cache, in memory, is empty by then)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anthropic
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, refused_url
from tests.proxy.test_anthropic_protocol import CALL, EOS, SECRET, USER, WEATHER


@asynccontextmanager
async def serve(fake: FakeUpstream, port: int) -> AsyncIterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSML_PROXY_")}
    env["DSML_PROXY_REASONING_SIGNING_SECRET"] = SECRET
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from proxy.cli import main; main()", "serve",
        "--upstream", fake.url, "--port", str(port), "--api-key", "sk-local",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.returncode is not None:
                    raise AssertionError("dsml-proxy serve exited")
                await asyncio.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)


@pytest.mark.slow
async def test_readme_recipes(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    port = int(refused_url().rsplit(":", 1)[1])
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "sk-local")
    request = {"model": "deepseek-v4", "max_tokens": 1000, "tools": [WEATHER]}
    async with serve(fake, port) as base:
        async with anthropic.AsyncAnthropic(max_retries=0) as claude:
            fake.push(CALL)
            first = await claude.messages.create(**request, messages=[USER])
            counted = await claude.messages.count_tokens(model="deepseek-v4", tools=[WEATHER],
                                                         messages=[USER])
        assert counted.input_tokens == first.usage.input_tokens
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-local",
                                      max_retries=0) as codex:
            fake.push("Hm.</think>Hello from V4." + EOS)
            async with codex.responses.stream(model="deepseek-v4", input="hi",
                                              store=False) as stream:
                assert (await stream.get_final_response()).output_text == "Hello from V4."
    thinking, call = first.content
    history = [USER, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "sunny"}]}]
    async with serve(fake, port), anthropic.AsyncAnthropic(max_retries=0) as claude:
        fake.push("ok</think>Sunny." + EOS)
        await claude.messages.create(**request, messages=history)
    assert thinking.thinking + "</think>" in fake.prompt_text()
