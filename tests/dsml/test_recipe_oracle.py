"""DeepSeek's own request layer, `deepseek-recipe`, as an independent oracle on generated requests.

`deepseek_recipe.ChatCompletionRequest(...).convert(...)` turns an OpenAI request into a
conversation and `DeepseekV4Encoding()` / `DeepseekV41Encoding()` `.render_conversation(...)`
renders it, reporting where its special tokens sit (`special_ranges`). On the requests generated here both
implementations must produce the same prompt text and the same special-token positions
(our control segments).

The generator stays inside the part of dsml.md section 3 where the two agree: tools,
strict schemas, response formats, tool choice, thinking and effort, tool results, drop
thinking, prefix continuation, system messages in mid-conversation (V4.1 keeps them as
`<｜System｜>` turns, the others fold them into the front system prompt). Known
differences, deliberately not generated:

- a call with no arguments: the weights' encoder writes an empty line inside the invoke,
  recipe one newline (section 3 item 11);
- floats like 1e-7 and integers beyond 2**53: Python writes `1e-07` and every digit,
  recipe `1e-7` and `1e+20` (item 11; the weights' encoder wins);
- `developer` messages: recipe rejects the role, we read it as system (item 1);
- dots in tool names: recipe rejects them, we accept them (item 4);
- `chat_template_kwargs` (vLLM's thinking switch): recipe ignores it (item 6);
- strict schemas that do not list every property in `required`: recipe fills `required`
  in, we return 400 as OpenAI does (item 4); recipe also re-serializes strict schemas in
  its own key order (we keep the client's, moving only `additionalProperties` and
  `required` behind `properties`), drops keywords it does not support (`default`,
  `minLength`) and rejects strict and non-strict tools side by side;
- `prefix: true` in a request with tools or with a json_object response format: recipe
  refuses it, we render it (the render vectors have prefix requests with tools);
- `response_format` together with `tools`: recipe refuses the pair, we render both sections
  (the render vectors have such requests);
- `tool_choice: "required"` or a named function: recipe appends the block opener
  `\\n\\n<｜DSML｜tool_calls>\\n` to the prompt (and refuses them in thinking mode); we
  leave the prompt alone and let the proxy feed that text to the parser (docs/design.md);
- recipe's V4 encoding has the 0731 effort tiers, so it is compared with dialect
  `v4-0731`, and with dialect `v4` through the tier each effort maps to;
- an integer `reasoning_effort` (a V4.1 budget 1-100): recipe accepts only names.
"""

from __future__ import annotations

import json
import random
from typing import Any

import deepseek_recipe as dr  # test-only dependency (pyproject's [test] extra)
import pytest

from dsml import Dialect, Prompt, render_chat

MODEL = "oracle-model"
V41_MODEL = "oracle-model-v41"
OPTIONS = (
    dr.ConversionOptions()
    .with_model_alias(MODEL, dr.ModelVersion.DeepseekV4Pro)
    .with_model_alias(V41_MODEL, dr.ModelVersion.DeepseekV41Flash)
)
BLOCK_OPENERS = {
    Dialect.V4_0731: "\n\n<｜DSML｜tool_calls>\n",
    Dialect.V4_1: "\n\n<｜DSML｜ calls>\n",
}

# Text pieces chosen to stress escaping and special-token handling.
FRAGMENTS = [
    "hello",
    "naïve café",
    "東京 北京",
    "emoji🙂",
    "line1\nline2",
    "  leading",
    "trailing  ",
    "tab\there",
    'say "hi"',
    "it's",
    "back\\slash",
    "x<y & a>b",
    "<tag>",
    '{"k": 1}',
    "<｜User｜>",
    "<｜end▁of▁sentence｜>",
    "｜DSML｜",
    '<｜DSML｜invoke name="x">',
    "</think>",
    "<think>",
    "مرحبا",
    "",
]
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
EFFORTS = [None, "none", "minimal", "low", "medium", "high", "xhigh", "max"]


class RequestGenerator:
    """Random OpenAI chat requests inside the agreed part of the mapping."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self, max_pieces: int = 4) -> str:
        return " ".join(self.rng.choice(FRAGMENTS) for _ in range(self.rng.randint(1, max_pieces)))

    def name(self) -> str:
        return "".join(self.rng.choice(NAME_CHARS) for _ in range(self.rng.randint(1, 12)))

    def value_schema(self, depth: int, strict: bool) -> dict[str, Any]:
        kind = self.rng.choice(["string", "integer", "number", "boolean", "array", "object"])
        if depth > 1 and kind in ("array", "object"):
            kind = "string"
        # Keys in recipe's order for strict schemas (it re-serializes them; we keep the
        # client's order): type, items/properties..., description, then enum.
        schema: dict[str, Any] = {"type": kind}
        if kind == "array":
            schema["items"] = self.value_schema(depth + 1, strict)
        elif kind == "object":
            schema.update(self.object_schema(depth + 1, strict, min_props=1))
        if self.rng.random() < 0.4:
            schema["description"] = self.text()
        if kind == "string" and self.rng.random() < 0.3:
            schema["enum"] = [self.text(1), "b", "c"]
        return schema

    def object_schema(self, depth: int, strict: bool, min_props: int = 0) -> dict[str, Any]:
        properties = {
            f"p{k}_{self.name()}": self.value_schema(depth, strict)
            for k in range(self.rng.randint(min_props, 4))
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if strict:
            schema["required"] = list(properties)
        elif properties and self.rng.random() < 0.7:
            schema["required"] = self.rng.sample(
                list(properties), self.rng.randint(1, len(properties))
            )
        return schema

    def tools(self) -> list[dict[str, Any]]:
        strict = self.rng.random() < 0.3  # recipe refuses strict and non-strict side by side
        tools = []
        for k in range(self.rng.randint(1, 3)):
            function: dict[str, Any] = {"name": f"t{k}_{self.name()}"}
            if self.rng.random() < 0.8:
                function["description"] = self.text()
            if strict or self.rng.random() < 0.9:
                function["parameters"] = self.object_schema(0, strict)
            if strict:
                function["strict"] = True
            tools.append({"type": "function", "function": function})
        return tools

    def argument(self) -> Any:
        kind = self.rng.choice(["str", "str", "int", "float", "bool", "null", "list", "dict"])
        return {
            "str": lambda: self.text(),
            "int": lambda: self.rng.randint(-1000, 10**6),
            "float": lambda: self.rng.choice([0.5, 3.25, -2.0, 100.125]),
            "bool": lambda: self.rng.random() < 0.5,
            "null": lambda: None,
            "list": lambda: [self.rng.randint(0, 9), self.text(1)],
            "dict": lambda: {"k": self.text(1), "n": self.rng.randint(0, 9)},
        }[kind]()

    def tool_round(
        self, tools: list[dict[str, Any]], turn: int, thinking: bool
    ) -> list[dict[str, Any]]:
        calls = []
        for k in range(self.rng.randint(1, 3)):
            # At least one argument: a call without any renders differently (see module doc).
            arguments = {
                f"a{n}_{self.name()}": self.argument() for n in range(self.rng.randint(1, 3))
            }
            calls.append(
                {
                    "id": f"call_{turn}_{k}",
                    "type": "function",
                    "function": {
                        "name": self.rng.choice(tools)["function"]["name"],
                        "arguments": json.dumps(arguments, ensure_ascii=self.rng.random() < 0.5),
                    },
                }
            )
        assistant: dict[str, Any] = {
            "role": "assistant",
            "content": self.text() if self.rng.random() < 0.5 else None,
        }
        assistant["tool_calls"] = calls
        if thinking or self.rng.random() < 0.3:
            assistant["reasoning_content"] = self.text()
        results = []
        for call in self.rng.sample(calls, len(calls)):  # any order: rendering sorts them
            content: Any = self.text()
            if self.rng.random() < 0.3:
                content = [
                    {"type": "text", "text": self.text()} for _ in range(self.rng.randint(1, 2))
                ]
            results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        return [assistant, *results]

    def request(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"model": MODEL}
        thinking_field = rng.choice([None, "enabled", "disabled"])
        if thinking_field:
            body["thinking"] = {"type": thinking_field}
        effort = rng.choice(EFFORTS)
        if effort:
            body["reasoning_effort"] = effort
        thinking = thinking_field != "disabled" and not (
            thinking_field is None and effort == "none"
        )
        tools = self.tools() if rng.random() < 0.7 else []
        if tools:
            body["tools"] = tools
            choices = ["auto", "none", None] + (["required", "named"] if not thinking else [])
            choice = rng.choice(choices)
            if choice == "named":
                body["tool_choice"] = {
                    "type": "function",
                    "function": {"name": tools[0]["function"]["name"]},
                }
            elif choice:
                body["tool_choice"] = choice

        messages: list[dict[str, Any]] = []
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": self.text()})
        num_turns = rng.randint(1, 3)
        for turn in range(num_turns):
            if turn and rng.random() < 0.2:
                # Mid-conversation instructions: V4.1 gives them a <｜System｜> turn, the
                # others fold them into the system prompt at the front.
                messages.append({"role": "system", "content": self.text()})
            messages.append({"role": "user", "content": self.text()})
            if tools and rng.random() < 0.6:
                messages += self.tool_round(tools, turn, thinking)
                if rng.random() < 0.3:
                    messages.append({"role": "user", "content": self.text()})
            if turn == num_turns - 1:
                break  # the request ends on a user turn or tool results
            answer: dict[str, Any] = {"role": "assistant", "content": self.text()}
            if rng.random() < 0.6:
                answer["reasoning_content"] = self.text()
            messages.append(answer)
        fmt = rng.choice([None, "text", "json_object", "json_schema"]) if not tools else None
        if not tools and fmt != "json_object" and rng.random() < 0.25:
            prefix: dict[str, Any] = {
                "role": "assistant",
                "content": "prefix " + self.text(),
                "prefix": True,
            }
            if thinking and rng.random() < 0.5:
                prefix["reasoning_content"] = self.text()
            messages.append(prefix)

        if fmt == "json_object":
            messages[0 if messages[0]["role"] == "user" else 1]["content"] += " Reply in JSON."
            body["response_format"] = {"type": "json_object"}
        elif fmt == "json_schema":
            schema = self.object_schema(0, strict=False, min_props=1)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "out", "schema": schema},
            }
        elif fmt == "text":
            body["response_format"] = {"type": "text"}
        body["messages"] = messages
        return body


def recipe_render(body: dict[str, Any], dialect: Dialect = Dialect.V4_0731) -> Any:
    if dialect == Dialect.V4_1:
        body = {**body, "model": V41_MODEL}
        encoding = dr.DeepseekV41Encoding()
    else:
        encoding = dr.DeepseekV4Encoding()
    conversation = dr.ChatCompletionRequest(json.dumps(body)).convert(OPTIONS).conversation
    return encoding.render_conversation(conversation)


def control_ranges(prompt: Prompt) -> list[tuple[int, int]]:
    ranges, offset = [], 0
    for segment in prompt.segments:
        if segment.control:
            ranges.append((offset, offset + len(segment.text)))
        offset += len(segment.text)
    return ranges


def forced_opener(body: dict[str, Any], dialect: Dialect = Dialect.V4_0731) -> str:
    """What recipe appends for a forced tool choice (we leave that to the parser)."""
    choice = body.get("tool_choice")
    return BLOCK_OPENERS[dialect] if choice == "required" or isinstance(choice, dict) else ""


SEEDS = range(300)


@pytest.mark.parametrize("dialect", [Dialect.V4_0731, Dialect.V4_1])
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_recipe(seed: int, dialect: Dialect) -> None:
    body = RequestGenerator(seed).request()
    expected = recipe_render(body, dialect)
    ours = render_chat(body, dialect=dialect)
    opener = forced_opener(body, dialect)
    assert ours.text + opener == expected.prompt
    # The opener's one special token is its ｜DSML｜, right after "\n\n<".
    opener_controls = [(len(ours.text) + 3, len(ours.text) + 3 + len("｜DSML｜"))] if opener else []
    assert control_ranges(ours) + opener_controls == [tuple(r) for r in expected.special_ranges]


# v4 writes the old "max" text for `max` only: recipe's `high` tier text. Every other
# effort renders like recipe's `low` (no prefix).
V4_TIER_IN_RECIPE = {"max": "high", "xhigh": "high"}


@pytest.mark.parametrize("seed", SEEDS[:100])
def test_v4_matches_recipe_through_the_effort_tiers(seed: int) -> None:
    body = RequestGenerator(seed).request()
    if body.get("reasoning_effort") == "none":
        return  # thinking off: no effort either way, covered by the 0731 test
    recipe_body = {
        **body,
        "reasoning_effort": V4_TIER_IN_RECIPE.get(body.get("reasoning_effort"), "low"),
    }
    ours = render_chat(body, dialect=Dialect.V4)
    assert ours.text + forced_opener(body) == recipe_render(recipe_body).prompt


def test_the_generator_covers_the_agreed_features() -> None:
    """Guard against a generator that silently stopped producing some feature."""
    bodies = [RequestGenerator(seed).request() for seed in SEEDS]
    features = {
        "tools": any(b.get("tools") for b in bodies),
        "strict": any(t["function"].get("strict") for b in bodies for t in b.get("tools", [])),
        "tool_choice_none": any(b.get("tool_choice") == "none" for b in bodies),
        "forced": any(forced_opener(b) for b in bodies),
        "json_object": any(
            b.get("response_format", {}).get("type") == "json_object" for b in bodies
        ),
        "json_schema": any(
            b.get("response_format", {}).get("type") == "json_schema" for b in bodies
        ),
        "tool_results": any(m["role"] == "tool" for b in bodies for m in b["messages"]),
        "prefix": any(m.get("prefix") for b in bodies for m in b["messages"]),
        "thinking_off": any(b.get("thinking", {}).get("type") == "disabled" for b in bodies),
        "max_effort": any(b.get("reasoning_effort") == "max" for b in bodies),
        "mid_system": any(m["role"] == "system" for b in bodies for m in b["messages"][1:]),
    }
    assert all(features.values()), features
