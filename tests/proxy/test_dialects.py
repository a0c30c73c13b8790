"""Every dialect (dsml.md section 2) through the real server, the fake engine and the SDKs.

The dialect decides rendering and parsing for every endpoint: the prompt the engine gets is
`dsml.render_chat(..., dialect=d)` (token ids where the V4 tokenizer is the model's, text
otherwise), the dialect's recorded completions parse to the reference parser's calls with no
repair counted, and a forced tool choice continues with the dialect's own block opener.
One server can serve several dialects under different model names (`Settings.models`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsml.dialects import Dialect, texts
from dsml.markers import EOS
from dsml.request import render_chat
from dsml.tokenizer import load_tokenizer
from proxy.cli import settings_from_args
from proxy.settings import Settings
from proxy.turn import count_prompt_tokens
from tests.fakes.upstream import FakeUpstream, refused_url
from tests.proxy.conftest import DATA, ProxyServer, StartProxy
from tests.proxy.test_chat_cases import check, request_for, run_both
from tests.proxy.test_settings_cli import _wait_http
from tests.proxy.test_turn_policy import scrape

DIALECTS = [d.value for d in Dialect]
# Where the V4 tokenizer is the model's, the prompt goes as ids (proxy.turn.sends_ids).
IDS_DIALECTS = {"v4", "v4-0731"}
# The forced openers, spelled out here rather than derived from dsml.dialects: what the
# model writes before its first invoke in each dialect (dsml.md section 2 and 5).
OPENERS = {
    "v4": ("\n\n<｜DSML｜tool_calls>\n", '<｜DSML｜invoke name="get_weather">\n'),
    "v4-0731": ("\n\n<｜DSML｜tool_calls>\n", '<｜DSML｜invoke name="get_weather">\n'),
    "v4.1": ("\n\n<｜DSML｜ calls>\n", '<｜DSML｜ invoke name="get_weather">\n'),
    "v3.2": ("\n\n<｜DSML｜function_calls>\n", '<｜DSML｜invoke name="get_weather">\n'),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def parse_cases(dialect: str) -> dict[str, dict[str, Any]]:
    path = DATA / "parse.jsonl" if dialect == "v4" else DATA / "dialects" / dialect / "parse.jsonl"
    with open(path, encoding="utf-8") as f:
        return {case["id"]: case for case in map(json.loads, f)}


def call_cases(dialect: str) -> list[str]:
    """A few tool-call cases: thinking and chat, one and several calls."""
    cases = parse_cases(dialect)
    with_calls = [cid for cid, c in cases.items() if c["expected"]["tool_calls"]]
    parallel = [cid for cid in with_calls if len(cases[cid]["expected"]["tool_calls"]) >= 2]
    thinking = [cid for cid in with_calls if cases[cid]["thinking"]]
    chat = [cid for cid in with_calls if not cases[cid]["thinking"]]
    picked = thinking[::50][:2] + chat[::50][:2] + parallel[:1]
    assert {cases[cid]["thinking"] for cid in picked} == {True, False}
    return picked


CASES = [(d, cid) for d in DIALECTS for cid in call_cases(d)]


def sent_prompt(fake: FakeUpstream, dialect: str, index: int = -1) -> Any:
    """What the engine received, checked for the dialect's transport."""
    body = fake.requests[index]
    if dialect in IDS_DIALECTS:
        assert isinstance(body["prompt"], list)
    else:
        # Text, and vLLM must not put a second BOS in front of the rendered one.
        assert isinstance(body["prompt"], str) and body["add_special_tokens"] is False
    return body["prompt"]


def rendered(request: dict[str, Any], dialect: str, thinking: bool) -> Any:
    prompt = render_chat(request, dialect=dialect, default_thinking=thinking)
    return load_tokenizer().encode_prompt(prompt) if dialect in IDS_DIALECTS else prompt.text


async def repairs(proxy: ProxyServer) -> float:
    return sum(v for (name, _), v in (await scrape(proxy)).items()
               if name == "dsml_proxy_dsml_repairs_total")


# -- chat completions, one dialect per server ------------------------------------------------


@pytest.mark.parametrize(("dialect", "case_id"), CASES)
async def test_recorded_calls_per_dialect(start_proxy: StartProxy, fake: FakeUpstream,
                                          dialect: str, case_id: str) -> None:
    proxy = await start_proxy(dialect=dialect)
    case = parse_cases(dialect)[case_id]
    plain, streamed = await run_both(proxy, fake, case)
    check(case, plain, streamed)  # stream and non-stream: the reference parser's calls
    request = request_for(case)
    expected = rendered(request, dialect, case["thinking"])
    assert sent_prompt(fake, dialect, 0) == sent_prompt(fake, dialect, 1) == expected
    # The dialect's own tags are native to the parser, not tolerated misspellings.
    assert await repairs(proxy) == 0


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_forced_named_tool_uses_the_dialect_opener(
        start_proxy: StartProxy, fake: FakeUpstream, dialect: str) -> None:
    proxy = await start_proxy(dialect=dialect)
    t = texts(dialect)
    block, invoke = OPENERS[dialect]
    fake.push(f'<｜DSML｜{t.parameter_tag} name="city" string="true">Paris</｜DSML｜'
              f'{t.parameter_tag}>\n</｜DSML｜{t.invoke_tag}>\n</｜DSML｜{t.block_tag}>{EOS}')
    request = {"model": "deepseek-chat", "messages": MESSAGES, "tools": [WEATHER],
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    reply = await proxy.client().chat.completions.create(**request)
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"})
    assert reply.choices[0].finish_reason == "tool_calls"
    prompt = render_chat(request, dialect=dialect, default_thinking=False).text
    assert fake.prompt_text() == prompt + block + invoke
    assert await repairs(proxy) == 0


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_forced_required_in_thinking_mode(start_proxy: StartProxy, fake: FakeUpstream,
                                                dialect: str) -> None:
    """Reasoning first, up to `</think>`; then the turn continues after `</think>` and the
    dialect's block opener."""
    proxy = await start_proxy(dialect=dialect)
    t = texts(dialect)
    block, invoke = OPENERS[dialect]
    fake.push("Paris, then.</think>ignored",
              f'{invoke}<｜DSML｜{t.parameter_tag} name="city" string="true">Paris</｜DSML｜'
              f'{t.parameter_tag}>\n</｜DSML｜{t.invoke_tag}>\n</｜DSML｜{t.block_tag}>{EOS}')
    request = {"model": "deepseek-reasoner", "messages": MESSAGES, "tools": [WEATHER],
               "tool_choice": "required"}
    reply = await proxy.client().chat.completions.create(**request)
    message = reply.choices[0].message
    assert message.reasoning_content == "Paris, then."
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    prompt = render_chat(request, dialect=dialect, default_thinking=True).text
    assert prompt.endswith("<think>")
    assert fake.requests[0]["stop"] == ["</think>"]
    assert fake.prompt_text(0) == prompt
    assert fake.prompt_text(1) == prompt + "Paris, then.</think>" + block
    sent_prompt(fake, dialect, 1)
    assert await repairs(proxy) == 0


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_tool_round_trip_in_thinking_mode(start_proxy: StartProxy, fake: FakeUpstream,
                                                dialect: str) -> None:
    """History with a call and its result renders in the dialect (v3.2: `<function_results>`,
    then `<think>` without a new assistant token), and the answer parses as reasoning + text."""
    proxy = await start_proxy(dialect=dialect)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    request = {"model": "deepseek-reasoner", "tools": [WEATHER], "messages": [
        *MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]}
    fake.push("It is sunny.</think>Sunny, 21 C." + EOS)
    reply = await proxy.client().chat.completions.create(**request)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == ("It is sunny.", "Sunny, 21 C.")
    assert sent_prompt(fake, dialect) == rendered(request, dialect, True)
    prompt = fake.prompt_text()
    assert prompt.endswith("<think>")
    assert f"<｜DSML｜{texts(dialect).block_tag}>" in prompt  # the call, in the dialect's tags
    if dialect == "v3.2":
        assert prompt.endswith("\n</function_results>\n\n<think>")


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_parallel_tool_calls_false_closes_the_dialect_block(
        start_proxy: StartProxy, fake: FakeUpstream, dialect: str) -> None:
    """Generation stops after the first invoke; the block is closed with the dialect's closer,
    so the turn counts as delivered calls, not as a truncated block."""
    proxy = await start_proxy(dialect=dialect)
    t = texts(dialect)

    def invoke(city: str) -> str:
        return (f'<｜DSML｜{t.invoke_tag} name="get_weather">\n<｜DSML｜{t.parameter_tag} '
                f'name="city" string="true">{city}</｜DSML｜{t.parameter_tag}>\n'
                f'</｜DSML｜{t.invoke_tag}>')

    fake.push(f"\n\n<｜DSML｜{t.block_tag}>\n{invoke('Paris')}\n{invoke('Rome')}\n"
              f"</｜DSML｜{t.block_tag}>{EOS}")
    reply = await proxy.client().chat.completions.create(
        model="deepseek-chat", messages=MESSAGES, tools=[WEATHER], parallel_tool_calls=False)
    assert [json.loads(c.function.arguments) for c in reply.choices[0].message.tool_calls] == [
        {"city": "Paris"}]
    samples = await scrape(proxy)
    assert samples[("dsml_proxy_tool_turns_total",
                    (("endpoint", "chat_completions"), ("outcome", "tool_calls")))] == 1
    assert await repairs(proxy) == 0


# -- several dialects on one server ---------------------------------------------------------

SERVED = [{"name": "ds-v3.2", "dialect": "v3.2"},
          {"name": "ds-v4.1", "dialect": "v4.1", "thinking": False},
          {"name": "ds-default"}]


@pytest.fixture
async def multi(start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy(dialect="v4-0731", model_name="ds-v4", models=SERVED)


async def test_models_lists_every_name(multi: ProxyServer) -> None:
    models = await multi.client().models.list()
    assert [m.id for m in models.data] == [
        "ds-v4", "deepseek-ai/DeepSeek-V4-Flash", "deepseek-chat", "deepseek-reasoner",
        "ds-v3.2", "ds-v4.1", "ds-default"]
    assert (await multi.client().models.retrieve("ds-v3.2")).id == "ds-v3.2"
    with pytest.raises(openai.NotFoundError):
        await multi.client().models.retrieve("ds-v9")
    with pytest.raises(openai.NotFoundError):
        await multi.client().chat.completions.create(model="ds-v9", messages=MESSAGES)


@pytest.mark.parametrize(("model", "dialect", "thinking"), [
    ("ds-v3.2", "v3.2", True),  # the server's default_thinking
    ("ds-v4.1", "v4.1", False),  # the entry's own
    ("ds-default", "v4-0731", True),  # no dialect: the server's
    ("ds-v4", "v4-0731", True),
    ("deepseek-chat", "v4-0731", False),  # DeepSeek's names keep the server's dialect
])
async def test_the_model_name_picks_the_dialect(multi: ProxyServer, fake: FakeUpstream,
                                                model: str, dialect: str, thinking: bool) -> None:
    fake.push(("Hmm.</think>" if thinking else "") + "Sunny." + EOS)
    request = {"model": model, "messages": MESSAGES, "tools": [WEATHER]}
    reply = await multi.client().chat.completions.create(**request)
    assert reply.choices[0].message.content == "Sunny."
    assert reply.model == model
    assert sent_prompt(fake, dialect) == rendered(request, dialect, thinking)


async def test_messages_and_responses_follow_the_model(multi: ProxyServer,
                                                      fake: FakeUpstream) -> None:
    v41, v32 = parse_cases("v4.1"), parse_cases("v3.2")
    case41 = next(c for c in v41.values() if c["expected"]["tool_calls"] and not c["thinking"])
    case32 = next(c for c in v32.values() if c["expected"]["tool_calls"] and c["thinking"])

    tools = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
              "input_schema": t["function"].get("parameters") or {"type": "object"}}
             for t in case41["tools"]]
    fake.push(case41["completion"])
    async with anthropic.AsyncAnthropic(base_url=multi.url, api_key="unused",
                                        max_retries=0) as claude:
        message = await claude.messages.create(model="ds-v4.1", max_tokens=4096, tools=tools,
                                               messages=[{"role": "user", "content": "Go."}])
        counted = await claude.messages.count_tokens(
            model="ds-v4.1", tools=tools, messages=[{"role": "user", "content": "Go."}])
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        (c["name"], c["arguments"]) for c in case41["expected"]["tool_calls"]]
    assert "<｜DSML｜ calls>" in sent_prompt(fake, "v4.1")  # v4.1's tools section
    # The V4 tokenizer lacks <｜System｜>: counted as one token, the same in both places.
    assert counted.input_tokens == message.usage.input_tokens > 0

    fake.push(case32["completion"])
    response = await multi.client().responses.create(
        model="ds-v3.2", input="Go.",
        tools=[{"type": "function", **t["function"]} for t in case32["tools"]])
    assert [(i.name, json.loads(i.arguments)) for i in response.output
            if i.type == "function_call"] == [
        (c["name"], c["arguments"]) for c in case32["expected"]["tool_calls"]]
    assert "<functions>" in sent_prompt(fake, "v3.2")  # v3.2's tools section
    assert await repairs(multi) == 0


@pytest.mark.parametrize(("model", "dialect"), [("ds-v3.2", "v3.2"), ("ds-v4.1", "v4.1"),
                                               ("ds-v4", "v4-0731")])
async def test_raw_completions_follow_the_model(multi: ProxyServer, fake: FakeUpstream,
                                                model: str, dialect: str) -> None:
    fake.push("4" + EOS)
    prompt = "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜></think>"
    reply = await multi.client().completions.create(model=model, prompt=prompt)
    assert reply.choices[0].text == "4"
    if dialect in IDS_DIALECTS:
        assert sent_prompt(fake, dialect) == load_tokenizer().encode_generated(prompt)
    else:
        assert sent_prompt(fake, dialect) == prompt
    assert reply.usage.prompt_tokens == len(load_tokenizer().encode_generated(prompt))


async def test_count_prompt_tokens_counts_the_system_token() -> None:
    tokenizer = load_tokenizer()
    request = {"messages": [{"role": "system", "content": "Be brief."}, *MESSAGES]}
    v41 = render_chat(request, dialect="v4.1", default_thinking=False)
    v4 = render_chat(request, dialect="v4", default_thinking=False)
    assert v41.text == v4.text.replace("<｜begin▁of▁sentence｜>",
                                       "<｜begin▁of▁sentence｜><｜System｜>", 1)
    assert count_prompt_tokens(tokenizer, v41) == len(tokenizer.encode_prompt(v4)) + 1
    assert count_prompt_tokens(tokenizer, v4) == len(tokenizer.encode_prompt(v4))


async def test_images_are_a_400_on_every_endpoint(multi: ProxyServer, fake: FakeUpstream) -> None:
    image_url = "data:image/png;base64,iVBORw0KGgo="
    client = multi.client()
    with pytest.raises(openai.BadRequestError) as chat:
        await client.chat.completions.create(model="ds-v4.1", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "what is it?"}]}])
    with pytest.raises(openai.BadRequestError) as responses:
        await client.responses.create(model="ds-v3.2", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": image_url},
            {"type": "input_text", "text": "what is it?"}]}])
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    content = [image, {"type": "text", "text": "what is it?"}]
    async with anthropic.AsyncAnthropic(base_url=multi.url, api_key="unused",
                                        max_retries=0) as claude:
        with pytest.raises(anthropic.BadRequestError) as messages:
            await claude.messages.create(model="ds-v4.1", max_tokens=10,
                                         messages=[{"role": "user", "content": content}])
        with pytest.raises(anthropic.BadRequestError) as counted:
            await claude.messages.count_tokens(model="ds-v4.1",
                                               messages=[{"role": "user", "content": content}])
    for err in (chat, responses):
        assert err.value.body["type"] == "invalid_request_error"  # OpenAI's error shape
        assert "image" in err.value.body["message"]
    for err in (messages, counted):
        assert err.value.body["type"] == "error"  # Anthropic's error shape
        assert err.value.body["error"]["type"] == "invalid_request_error"
        assert "image" in err.value.body["error"]["message"]
    assert fake.requests == []


# -- metrics ----------------------------------------------------------------------------------


def build_info(text: str) -> list[dict[str, str]]:
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "dsml_proxy_build_info" and s.value == 1]


async def test_build_info_carries_the_dialect(start_proxy: StartProxy) -> None:
    one = await start_proxy(dialect="v4.1")
    text = (await one.client()._client.get(one.url + "/metrics")).text
    assert [labels["dialect"] for labels in build_info(text)] == ["v4.1"]


async def test_build_info_one_series_per_served_dialect(multi: ProxyServer,
                                                        fake: FakeUpstream) -> None:
    fake.push("Hmm.</think>Sunny." + EOS)
    await multi.client().chat.completions.create(model="ds-v3.2", messages=MESSAGES)
    text = (await multi.client()._client.get(multi.url + "/metrics")).text
    assert sorted(labels["dialect"] for labels in build_info(text)) == [
        "v3.2", "v4-0731", "v4.1"]
    # Per-request series never carry the dialect (issue 6).
    for family in text_string_to_metric_families(text):
        if family.name != "dsml_proxy_build_info":
            assert all("dialect" not in s.labels for s in family.samples), family.name


# -- configuration ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in os.environ if k.startswith("DSML_PROXY_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def served(settings: Settings) -> list[tuple[str, str | None, bool | None]]:
    return [(m.name, m.dialect, m.thinking) for m in settings.models]


def test_dialect_flag_env_and_toml(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert settings_from_args(["serve"]).dialect == "v4"
    for dialect in DIALECTS:
        assert settings_from_args(["serve", "--dialect", dialect]).dialect == dialect
    config = tmp_path / "proxy.toml"
    config.write_text('dialect = "v3.2"\n')
    base = ["serve", "--config", str(config)]
    assert settings_from_args(base).dialect == "v3.2"  # TOML
    clean_env.setenv("DSML_PROXY_DIALECT", "v4.1")
    assert settings_from_args(base).dialect == "v4.1"  # env beats TOML
    assert settings_from_args([*base, "--dialect", "v4-0731"]).dialect == "v4-0731"  # flag wins
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--dialect", "v5"])  # argparse: not a choice
    clean_env.setenv("DSML_PROXY_DIALECT", "v5")
    with pytest.raises(ValueError, match="unknown dialect"):
        settings_from_args(["serve"])


def test_per_model_dialects_flag_env_and_toml(tmp_path: Path,
                                              clean_env: pytest.MonkeyPatch) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('models = [{name = "a", dialect = "v3.2"}, {name = "b", thinking = false}]\n')
    base = ["serve", "--config", str(config)]
    assert served(settings_from_args(base)) == [("a", "v3.2", None), ("b", None, False)]
    # The array-of-tables spelling of the same list.
    config.write_text('[[models]]\nname = "a"\ndialect = "v4.1"\n')
    assert served(settings_from_args(base)) == [("a", "v4.1", None)]
    clean_env.setenv("DSML_PROXY_MODELS", '[{"name": "e", "dialect": "v4-0731"}]')
    assert served(settings_from_args(base)) == [("e", "v4-0731", None)]  # env beats TOML
    flags = ["--served-model", "f=v3.2", "--served-model", "g"]
    assert served(settings_from_args([*base, *flags])) == [("f", "v3.2", None), ("g", None, None)]
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--served-model", "f=v5"])
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--served-model", "=v3.2"])
    with pytest.raises(ValueError, match="unknown dialect"):
        Settings(models=[{"name": "a", "dialect": "v5"}])
    with pytest.raises(ValueError, match="more than once"):
        Settings(models=[{"name": "a"}, {"name": "a", "dialect": "v3.2"}])
    with pytest.raises(ValueError):
        Settings(models=[{"name": "a", "dialects": "v3.2"}])  # a typo is not ignored


async def test_console_script_serves_several_dialects(fake: FakeUpstream) -> None:
    port = int(refused_url().rsplit(":", 1)[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSML_PROXY_")}
    env["DSML_PROXY_MODELS"] = '[{"name": "from-env", "dialect": "v4-0731"}]'
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from proxy.cli import main; main()", "serve",
        "--upstream", fake.url, "--port", str(port), "--dialect", "v4.1",
        "--served-model", "ds-v3.2=v3.2", "--served-model", "ds-v3.2-chat=v3.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        assert await _wait_http(base + "/health", proc) == 200
        fake.push("Hmm.</think>Hello!" + EOS)
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/chat/completions", json={
                    "model": "ds-v3.2", "messages": MESSAGES}) as resp:
                assert resp.status == 200
            async with session.get(base + "/v1/models") as resp:
                ids = [m["id"] for m in (await resp.json())["data"]]
            async with session.get(base + "/metrics") as resp:
                metrics = await resp.text()
        assert fake.prompt_text() == render_chat({"messages": MESSAGES}, dialect="v3.2").text
        # Flags beat the environment: the env's list is replaced, not merged.
        assert ids == ["deepseek-v4", "deepseek-ai/DeepSeek-V4-Flash", "deepseek-chat",
                       "deepseek-reasoner", "ds-v3.2", "ds-v3.2-chat"]
        assert sorted(labels["dialect"] for labels in build_info(metrics)) == ["v3.2", "v4.1"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert "dialects v4.1, v3.2: the proxy has no tokenizer of these models" in stderr.decode()
