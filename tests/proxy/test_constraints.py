"""Constrained decoding through the proxy: which grammar each generation gets, each
engine's spelling of it, and that every grammar sent compiles with the llguidance entry
point that engine calls (vLLM's guidance backend: `grammar_from("grammar")`, SGLang's:
`grammar_from("ebnf")`, llama.cpp's: text starting with `%llguidance`, compiled as Lark)."""

from __future__ import annotations

import json

import llguidance
import openai
import pytest

from dsml import markers
from dsml.grammar_match import compiled_matcher
from dsml.prompt import Prompt, Segment
from dsml.tokenizer import load_tokenizer
from proxy import state
from proxy.backends.base import GenerateRequest
from proxy.backends.constraints import TurnConstraints, upstream_fields
from proxy.backends.upstream import UpstreamBackend
from proxy.settings import Settings, UpstreamKind
from proxy.turn import forced_opener
from tests.fakes.upstream import Reply

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}
CALL = (markers.invoke_open("get_weather") + "\n" + markers.parameter_open("city", True)
        + "Taipei" + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE)
BLOCK = f"\n\n{markers.TOOL_CALLS_OPEN}\n{CALL}\n{markers.TOOL_CALLS_CLOSE}"
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def prompt(tool_choice="auto", thinking=False, tools=(TOOL,), text="x", prefix="") -> Prompt:
    return Prompt([Segment(text)], thinking=thinking, tools=list(tools), tool_choice=tool_choice,
                  prefix=prefix)


def accepts(grammar: str, text: str) -> bool:
    m = compiled_matcher(grammar)
    return all(m.consume_token(t) for t in load_tokenizer().encode_generated(text)) \
        and m.is_stopped()


def grammar_for(mode="all", generated="", dialect="v4", parallel=True, **kw) -> str | None:
    p = prompt(**kw)
    return TurnConstraints(mode).grammar(p, generated, forced=forced_opener(p, dialect),
                                         dialect=dialect, parallel_tool_calls=parallel)


@pytest.mark.parametrize(("kind", "fields"), [
    (UpstreamKind.VLLM, lambda g: {"structured_outputs": {"grammar": g}}),
    (UpstreamKind.SGLANG, lambda g: {"ebnf": g}),
    (UpstreamKind.LLAMACPP, lambda g: {"grammar": g}),
    (UpstreamKind.DS4, lambda g: {}),
])
def test_each_engine_gets_its_spelling(kind: UpstreamKind, fields) -> None:
    grammar = grammar_for(thinking=True)
    assert grammar is not None
    assert upstream_fields(kind, grammar) == fields(grammar)
    assert upstream_fields(kind, None) == {}
    body = UpstreamBackend("http://127.0.0.1:9", kind=kind).build_body(
        GenerateRequest(prompt_ids=[0, 1], prompt_text="x", grammar=grammar))
    for key, value in fields(grammar).items():
        assert body[key] == value
    assert "grammar" not in body or kind is UpstreamKind.LLAMACPP
    plain = UpstreamBackend("http://127.0.0.1:9", kind=kind).build_body(
        GenerateRequest(prompt_ids=[0, 1], prompt_text="x"))
    assert not {"structured_outputs", "ebnf", "grammar"} & plain.keys()


SHAPES = [
    {}, {"thinking": True}, {"tool_choice": "required"}, {"tool_choice": NAMED},
    {"tool_choice": "required", "thinking": True}, {"tool_choice": "none"}, {"tools": ()},
    {"parallel": False},
    {"generated": markers.THINK_CLOSE + forced_opener(prompt("required")),
     "tool_choice": "required", "thinking": True},
    {"generated": forced_opener(prompt(NAMED)), "tool_choice": NAMED},
    {"generated": "y" + markers.THINK_CLOSE, "thinking": True},
]


@pytest.mark.parametrize("shape", SHAPES, ids=range(len(SHAPES)))
def test_every_grammar_sent_compiles_where_it_goes(shape: dict) -> None:
    grammar = grammar_for(**shape)
    assert grammar is not None and grammar.startswith("%llguidance")
    for kind in ("grammar", "ebnf", "lark"):  # vLLM, SGLang, llama.cpp
        assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from(kind, grammar)) == ""
    assert compiled_matcher(grammar).is_error() is False


def test_modes_and_where_no_grammar_applies() -> None:
    assert grammar_for("off") is None
    assert grammar_for("required") is None  # auto: the model may answer
    assert grammar_for("required", tool_choice="required") is not None
    # a strict tool's calls must follow its schema: constrained in "required" mode too
    strict = {**TOOL, "function": {**TOOL["function"], "strict": True}}
    assert grammar_for("required", tools=(TOOL, strict)) is not None
    assert grammar_for("required", tools=({**TOOL, "function": {**TOOL["function"],
                                                                "strict": False}},)) is None
    assert grammar_for("all") is not None
    assert grammar_for(dialect="v4.1") is None  # other tags and think ids: not compiled
    assert grammar_for(prefix="Sure") is None  # a continuation of client text
    assert grammar_for(generated="half <") is None  # no phase starts there
    with pytest.raises(ValueError, match="constrained_decoding"):
        TurnConstraints("sometimes")  # type: ignore[arg-type]
    assert Settings().constrained_decoding == "all"
    with pytest.raises(ValueError):
        Settings(constrained_decoding="sometimes")


def test_phases_follow_the_turn_runner() -> None:
    # Thinking + required: reasoning up to `</think>` first, then the block after the opener.
    first = grammar_for(tool_choice="required", thinking=True)
    assert accepts(first, "Let me see." + markers.THINK_CLOSE)
    assert not accepts(first, "Let me see." + BLOCK + markers.EOS)
    opener = forced_opener(prompt("required"))
    second = grammar_for(tool_choice="required", thinking=True,
                         generated=markers.THINK_CLOSE + opener)
    assert accepts(second, BLOCK.removeprefix(opener) + markers.EOS)
    # Chat + required where the renderer ended the prompt with the opener.
    in_prompt = grammar_for(tool_choice="required", text="x" + opener)
    assert accepts(in_prompt, BLOCK.removeprefix(opener) + markers.EOS)
    # The whole turn in auto mode: an answer or a block, never DSML in the answer.
    whole = grammar_for(thinking=True)
    assert accepts(whole, "Hmm." + markers.THINK_CLOSE + "Sunny." + markers.EOS)
    assert accepts(whole, "Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
    assert not accepts(whole, "Hmm." + BLOCK + markers.THINK_CLOSE + markers.EOS)


async def test_proxy_sends_grammars_and_counts_constrained_turns(start_proxy, fake) -> None:
    proxy = await start_proxy(constrained_decoding="all")
    fake.push("Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
    client = proxy.client()
    reply = await client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "weather?"}],
        tools=[TOOL])
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    sent = fake.requests[-1]["structured_outputs"]["grammar"]
    assert accepts(sent, "Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)

    m = proxy.app[state.METRICS]
    assert m.constrained_turns.labels("true", "tool_calls")._value.get() == 1
    assert m.constrained_calls.labels("true", "valid")._value.get() == 1
    assert m.constrained_turns.labels("false", "tool_calls")._value.get() == 0

    off = await start_proxy(constrained_decoding="off")
    fake.push(BLOCK + markers.EOS)
    await off.client().chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "weather?"}], tools=[TOOL])
    assert "structured_outputs" not in fake.requests[-1]
    m = off.app[state.METRICS]
    assert m.constrained_turns.labels("false", "tool_calls")._value.get() == 1
    assert m.constrained_turns.labels("true", "tool_calls")._value.get() == 0


def test_cli_flag() -> None:
    from proxy.cli import settings_from_args

    assert settings_from_args(["serve", "--constrained-decoding", "required"]
                              ).constrained_decoding == "required"
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--constrained-decoding", "sometimes"])


def test_grammar_mask_allows_what_the_grammar_allows() -> None:
    import llguidance.torch as llt
    import torch

    from dsml.grammar_match import EOS_ID, MODEL_VOCAB
    from proxy.backends.grammar_mask import GrammarMask, apply_bitmask

    bits = torch.randint(-2**31, 2**31 - 1, (1, (MODEL_VOCAB + 31) // 32), dtype=torch.int32)
    logits = torch.randn(MODEL_VOCAB)
    theirs = logits.clone().reshape(1, -1)
    llt.apply_token_bitmask_inplace(theirs, bits)
    assert torch.equal(apply_bitmask(logits, bits), theirs[0])

    tok = load_tokenizer()
    grammar = grammar_for(tool_choice="required", generated=forced_opener(prompt("required")))
    prompt_ids = [0, 5, 6]
    mask = GrammarMask(grammar, len(prompt_ids))
    assert mask.never_empty
    rest = tok.encode_generated(BLOCK.removeprefix(forced_opener(prompt("required")))
                                + markers.EOS)
    ids = list(prompt_ids)
    for token in rest:  # each of the call's tokens is allowed at its step
        out = mask(ids, torch.zeros(MODEL_VOCAB))
        assert torch.isfinite(out[token]), tok.decode([token])
        assert not torch.isfinite(out).all()
        ids.append(token)
    # The grammar is done (EOS consumed): EOS alone, never an all-banned row.
    out = mask(ids, torch.zeros(MODEL_VOCAB))
    assert torch.isfinite(out).nonzero().flatten().tolist() == [EOS_ID]
    assert mask.rejected == 0


async def test_an_engine_without_llguidance_gets_the_turn_unconstrained(start_proxy, fake,
                                                                        caplog) -> None:
    # vLLM without the guidance backend answers 400 to a grammar: a drop-in proxy must not
    # break a working engine, so the turn is sent again without it, and so are later turns.
    proxy = await start_proxy(constrained_decoding="all")
    fake.push(Reply(status=400, text="grammar backend xgrammar cannot compile this grammar"),
              "Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS,
              "Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
    client = proxy.client()
    for _ in range(2):
        reply = await client.chat.completions.create(
            model="deepseek-reasoner", messages=[{"role": "user", "content": "weather?"}],
            tools=[TOOL])
        assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "structured_outputs" in fake.requests[0]
    assert [("structured_outputs" in r) for r in fake.requests[1:]] == [False, False]
    assert "refused the constrained-decoding grammar" in caplog.text


async def test_a_400_for_another_reason_is_the_clients_and_keeps_grammars(start_proxy,
                                                                          fake) -> None:
    proxy = await start_proxy(constrained_decoding="all")
    fake.push(Reply(status=400, text="too long"), Reply(status=400, text="too long"),
              "Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
    client = proxy.client()
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(
            model="deepseek-reasoner", messages=[{"role": "user", "content": "weather?"}],
            tools=[TOOL])
    await client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "weather?"}],
        tools=[TOOL])
    assert "structured_outputs" in fake.requests[-1]


# -- response_format ---------------------------------------------------------------------------

ANSWER = {"type": "object", "properties": {
    "city": {"type": "string"}, "temp": {"type": "integer", "minimum": -90, "maximum": 60}},
    "required": ["city", "temp"], "additionalProperties": False}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "w", "schema": ANSWER, "strict": True}}
GOOD = '{"city": "Oslo", "temp": 7}'
PRETTY = '{\n  "city": "Oslo",\n  "temp": -3\n}'
# Each breaks the schema (or is not JSON alone); free text accepts them all.
BAD = ['{"city": "Oslo"}', '{"city": "Oslo", "temp": "7"}', '{"city": "Oslo", "temp": 99}',
       '{"city": "Oslo", "temp": 7, "wind": 3}', "Sure! " + GOOD, '["Oslo", 7]',
       '{"city": "Oslo <｜DSML｜tool_calls>", "temp": 7}']


def assert_enforces_answer(grammar: str, before: str = "") -> None:
    assert accepts(grammar, before + GOOD + markers.EOS)
    assert accepts(grammar, before + PRETTY + markers.EOS)
    for bad in BAD:
        assert not accepts(grammar, before + bad + markers.EOS), bad


def sent_grammar(fake) -> str:
    return fake.requests[-1]["structured_outputs"]["grammar"]


async def test_chat_json_schema_is_enforced(start_proxy, fake) -> None:
    proxy = await start_proxy(constrained_decoding="all")
    client = proxy.client()
    fake.push(GOOD + markers.EOS)
    reply = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        response_format=AS_SCHEMA)
    assert reply.choices[0].message.content == GOOD
    assert_enforces_answer(sent_grammar(fake))
    # Thinking: the reasoning first (free), then the JSON.
    fake.push("Cold." + markers.THINK_CLOSE + GOOD + markers.EOS)
    await client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        response_format=AS_SCHEMA)
    grammar = sent_grammar(fake)
    assert_enforces_answer(grammar, before="Cold." + markers.THINK_CLOSE)
    assert not accepts(grammar, GOOD + markers.EOS)  # the reasoning must close first
    # With tools the turn may call one instead (no content before the block).
    fake.push("Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
    reply = await client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        response_format=AS_SCHEMA, tools=[TOOL])
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    grammar = sent_grammar(fake)
    assert accepts(grammar, "Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
    assert_enforces_answer(grammar, before="Hmm." + markers.THINK_CLOSE)


async def test_chat_json_object_is_enforced(start_proxy, fake) -> None:
    proxy = await start_proxy(constrained_decoding="all")
    fake.push('{"a": 1}' + markers.EOS)
    await proxy.client().chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"})
    grammar = sent_grammar(fake)
    assert accepts(grammar, '{"a": [1, {"b": null}], "c": "d"}' + markers.EOS)
    assert accepts(grammar, "{}" + markers.EOS)
    for bad in ['Here: {"a": 1}', "[1]", '"a"', '{"a": 1', '{"a": "x</think>"}']:
        assert not accepts(grammar, bad + markers.EOS), bad


async def test_responses_text_format_is_enforced(start_proxy, fake) -> None:
    proxy = await start_proxy(constrained_decoding="all")
    fake.push(GOOD + markers.EOS)
    reply = await proxy.client().responses.create(
        model="deepseek-chat", input="Weather in Oslo?",
        text={"format": {"type": "json_schema", "name": "w", "strict": True, "schema": ANSWER}})
    assert reply.output_text == GOOD
    assert_enforces_answer(sent_grammar(fake))


async def test_anthropic_output_format_is_enforced(start_proxy, fake) -> None:
    import aiohttp

    proxy = await start_proxy(constrained_decoding="all")
    fake.push(GOOD + markers.EOS)
    body = {"model": "deepseek-chat", "max_tokens": 100,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "output_config": {"format": {"type": "json_schema", "schema": ANSWER}}}
    async with aiohttp.ClientSession() as http, \
            http.post(proxy.url + "/v1/messages", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["content"][0]["text"] == GOOD
    assert_enforces_answer(sent_grammar(fake))


# sha256 of the grammars before response_format reached them: a request without one must
# still get exactly these bytes.
GOLDEN = {
    "auto": "8bc667b92352093bec84ab55d78c2abe5fc788b7f0356486508d51e862e45381",
    "thinking": "506198db6d37f1ac10b160cccecd39a85a76b4771dde6f0d19e7774de7b20a86",
    "required": "7bcd81032a94d99f76cbafd2c22c450d4c07a03356dc1c4d025657ec98bbbc50",
    "named_thinking": "691d6ad7d237cc6c255f72f66e2616d507172d0afebdabdd6731f264d71f36f6",
    "no_tools": "01ee593d64f4187f8b0b6882d41eb53bd305af76cc1b88484d3a13cea8e4361b",
    "no_tools_thinking": "5f4d169c4385f61f6d68e54cf9669d69b565db9ccd69d8e1543d11b556d29148",
}
GOLDEN_SHAPES = {"auto": {}, "thinking": {"thinking": True}, "required": {"tool_choice": "required"},
                 "named_thinking": {"tool_choice": NAMED, "thinking": True},
                 "no_tools": {"tools": ()}, "no_tools_thinking": {"tools": (), "thinking": True}}


def sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


async def test_no_response_format_keeps_the_grammar_byte_identical(start_proxy, fake) -> None:
    for name, shape in GOLDEN_SHAPES.items():
        assert sha(grammar_for(**shape)) == GOLDEN[name], name
    proxy = await start_proxy(constrained_decoding="all")
    client = proxy.client()
    weather = [{"role": "user", "content": "weather?"}]
    for extra in ({}, {"response_format": {"type": "text"}}):
        fake.push("Hmm." + markers.THINK_CLOSE + BLOCK + markers.EOS)
        await client.chat.completions.create(model="deepseek-reasoner", messages=weather,
                                             tools=[TOOL], **extra)
        assert sha(sent_grammar(fake)) == GOLDEN["thinking"]
        fake.push("Sunny." + markers.EOS)
        await client.chat.completions.create(model="deepseek-chat", messages=weather, **extra)
        assert sha(sent_grammar(fake)) == GOLDEN["no_tools"]
    fake.push("Hmm." + markers.THINK_CLOSE + "Sunny." + markers.EOS)
    await client.responses.create(model="deepseek-reasoner", input="weather?", tools=[{
        "type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}])
    assert sha(sent_grammar(fake)) == GOLDEN["thinking"]


async def test_required_mode_constrains_json_answers(start_proxy, fake) -> None:
    proxy = await start_proxy(constrained_decoding="required")
    client = proxy.client()
    fake.push(GOOD + markers.EOS)
    await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        response_format=AS_SCHEMA, tools=[TOOL])
    assert_enforces_answer(sent_grammar(fake))
    fake.push("Sunny." + markers.EOS)
    await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[TOOL])
    assert "structured_outputs" not in fake.requests[-1]


def test_a_json_answer_through_the_embedded_engines_mask() -> None:
    import torch

    from dsml.grammar_match import EOS_ID, MODEL_VOCAB
    from proxy.backends.grammar_mask import GrammarMask

    p = prompt(tools=())
    p.response_format = AS_SCHEMA
    grammar = TurnConstraints("all").grammar(p, "", forced="", dialect="v4")
    assert grammar is not None
    tok = load_tokenizer()
    mask = GrammarMask(grammar, 1)
    ids = [0]
    for token in tok.encode_generated(PRETTY + markers.EOS):
        out = mask(ids, torch.zeros(MODEL_VOCAB))
        assert torch.isfinite(out[token]), tok.decode([token])
        ids.append(token)
    assert torch.isfinite(mask(ids, torch.zeros(MODEL_VOCAB))).nonzero().flatten().tolist() == [
        EOS_ID]
    # Prose is masked from the first token on.
    first = GrammarMask(grammar, 1)([0], torch.zeros(MODEL_VOCAB))
    assert not torch.isfinite(first[tok.encode_generated("Sure")[0]])


def test_a_pattern_llguidance_refuses_leaves_the_turn_unconstrained(caplog) -> None:
    for pattern in (r"\bcity\b", "(^a)", "(?=x)y"):
        tool = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"s": {"type": "string", "pattern": pattern}},
            "required": ["s"]}}}
        assert grammar_for(tools=(tool,)) is None, pattern
    assert "no grammar for this turn" in caplog.text


async def test_a_random_model_writes_only_schema_valid_answers() -> None:
    # The tiny random-weights model on the embedded engine: whatever it would write, the
    # mask leaves it only JSON valid under the schema, and (whitespace bounded) an end.
    torch = pytest.importorskip("torch")
    import jsonschema
    from aiohttp import web

    from engine.config import ModelConfig
    from engine.model import Transformer
    from engine.runtime import Engine
    from proxy.app import create_app, make_runner
    from proxy.backends.embedded import EmbeddedBackend

    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "unit": {"type": "string", "enum": ["c", "f"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
        "required": ["ok", "unit", "n", "tags"], "additionalProperties": False}
    model = Transformer(ModelConfig.tiny(), dtype=torch.float32).init_random_(3)
    backend = EmbeddedBackend(Engine(model, load_tokenizer(), "cpu"))
    runner = make_runner(create_app(backend, Settings(log_requests=False)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0,
                                      timeout=120) as client:
            for seed in range(4):
                reply = await client.chat.completions.create(
                    model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=300, temperature=1.0, seed=seed, response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": schema, "strict": True}})
                choice = reply.choices[0]
                assert choice.finish_reason == "stop", choice.message.content
                jsonschema.validate(json.loads(choice.message.content), schema)
    finally:
        await runner.cleanup()
