"""An OpenAI-style chat request -> DeepSeek's message list -> a `Prompt` (dsml.md section 3).

The mapping follows DeepSeek's own request layer (`deepseek-recipe`) except where the spec
notes otherwise: `developer` messages are accepted as system messages, `reasoning` is an
alias of `reasoning_content`, tool names may contain dots, and history arguments that are
not a JSON object are an error instead of being wrapped.

Every problem with the request raises `RenderError` (400) with the offending parameter;
image parts raise `UnsupportedError` (no engine here runs a vision tower).
"""

from __future__ import annotations

import copy
import marshal
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dsml import markers as mk
from dsml.dialects import Dialect, Effort
from dsml.errors import RenderError, UnsupportedError
from dsml.lru import SizedLRU
from dsml.patterns import schema_pattern_error
from dsml.prompt import Prompt, Segment
from dsml.render import JSON_OBJECT, _render_messages

TOOL_NAME = re.compile(r"[a-zA-Z0-9_.-]{1,64}")
# Objects and arrays inside one tool's parameters, nested: real schemas stay under ~20
# (each property level is two); the copy and the checks below recurse, so a bound keeps a
# client's 450-deep schema from reaching Python's recursion limit.
MAX_SCHEMA_DEPTH = 64

# DeepSeek's API folds OpenAI's effort names onto its tiers; "none" turns thinking off.
EFFORT_TIERS = {
    "minimal": Effort.LOW,
    "low": Effort.LOW,
    "medium": Effort.HIGH,
    "high": Effort.HIGH,
    "xhigh": Effort.HIGH,
    "max": Effort.MAX,
}
# The first V4 release had two tiers, and vLLM's V4 encoder (which the render vectors
# follow) sends `xhigh` to its top one; 0731 moved its texts down a tier instead.
EFFORT_TIER_OVERRIDES: dict[Dialect, dict[str, Effort]] = {Dialect.V4: {"xhigh": Effort.MAX}}
# What a request without `reasoning_effort` gets (DeepSeek's request layer and vLLM agree).
DEFAULT_EFFORT: dict[Dialect, Effort | None] = {
    Dialect.V4: None,
    Dialect.V4_0731: Effort.HIGH,
    Dialect.V4_1: Effort.HIGH,  # budget 75
    Dialect.V3_2: None,  # V3.2 has no effort prompt
}
# Model names of DeepSeek's API that select the thinking mode.
MODEL_THINKING = {"deepseek-chat": False, "deepseek-reasoner": True}
IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def render_chat(
    request: Any, dialect: Dialect | str = Dialect.V4, default_thinking: bool = True
) -> Prompt:
    """Render an OpenAI chat request (a dict, or any object with `model_dump()`)."""
    body = _as_dict(request)
    try:
        dialect = Dialect(dialect)
    except ValueError:
        raise RenderError(f"unknown dialect {dialect!r}", param="dialect") from None
    thinking = _thinking(body, default_thinking)
    effort = _effort(body, dialect)
    offered, tool_choice, offered_key = _offered_tools(body)
    tools = [t["function"] for t in offered]
    response_format = _response_format(body, dialect)
    messages = _messages(body.get("messages"), dialect)

    conversation = _with_system_prompt(messages, dialect)
    if not conversation:
        raise RenderError(
            "messages hold nothing to render (only empty system messages)", param="messages"
        )
    if (tools and tool_choice != "none") or response_format is not None:
        if conversation[0]["role"] != "system":
            conversation.insert(0, {"role": "system", "content": ""})
        if tools and tool_choice != "none":
            conversation[0]["tools"] = offered
        if response_format is not None:
            conversation[0]["response_format"] = response_format

    prompt = _render_messages(
        conversation,
        thinking_mode="thinking" if thinking else "chat",
        dialect=dialect,
        reasoning_effort=effort,
        # `offered`'s tools-section cache key, already known (see _offered_tools): by the
        # identity of the list, which this call holds until the rendering is done.
        tools_keys={id(offered): offered_key} if offered_key is not None else None,
    )
    last = prompt.segments[-1]
    in_generation = last.control and last.text in (mk.THINK_OPEN, mk.THINK_CLOSE)
    if not conversation[-1].get("prefix") and not in_generation:
        # The reference writes a generation prompt only after a user turn (or tool results);
        # a request that ends elsewhere still asks for a new assistant turn (as DeepSeek's
        # request layer and vLLM's V3.2 encoder do).
        prompt.segments.append(Segment(mk.ASSISTANT, control=True))
        prompt.segments.append(Segment(mk.THINK_OPEN if thinking else mk.THINK_CLOSE, control=True))
        prompt.thinking = thinking
    prompt.tools = (
        [] if tool_choice == "none" else [{"type": "function", "function": t} for t in tools]
    )
    prompt.tool_choice = tool_choice
    prompt.response_format = _format_constraint(body, response_format)
    return prompt


def _with_system_prompt(messages: list[dict[str, Any]], dialect: Dialect) -> list[dict[str, Any]]:
    """V4.1 keeps system messages where they are (it has a <｜System｜> turn); the other
    dialects have no system token, so every system message joins one prompt at the front."""
    if dialect == Dialect.V4_1:
        return list(messages)
    system_texts = [m["content"] for m in messages if m["role"] == "system"]
    conversation = [m for m in messages if m["role"] != "system"]
    if system_texts:
        conversation.insert(0, {"role": "system", "content": "\n\n".join(system_texts)})
    return conversation


def _as_dict(request: Any) -> dict[str, Any]:
    if hasattr(request, "model_dump"):
        request = request.model_dump(exclude_none=True)
    if not isinstance(request, Mapping):
        raise RenderError("the request must be a JSON object")
    return dict(request)


# ---------------------------------------------------------------------------------------
# Thinking and effort


def _thinking(body: Mapping[str, Any], default: bool) -> bool:
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, Mapping) else None
        if kind not in ("enabled", "disabled"):
            raise RenderError(
                'thinking.type must be "enabled" or "disabled"', param="thinking.type"
            )
        return kind == "enabled"
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, Mapping) and kwargs.get("thinking") is not None:
        if not isinstance(kwargs["thinking"], bool):
            raise RenderError(
                "chat_template_kwargs.thinking must be a boolean",
                param="chat_template_kwargs.thinking",
            )
        return kwargs["thinking"]
    if body.get("reasoning_effort") == "none":
        return False
    model = body.get("model")
    return MODEL_THINKING.get(model, default) if isinstance(model, str) else default


def _effort(body: Mapping[str, Any], dialect: Dialect) -> Effort | int | None:
    value = body.get("reasoning_effort")
    if value is None or value == "none":
        return DEFAULT_EFFORT[dialect]
    if dialect == Dialect.V4_1 and type(value) is int:
        if not 1 <= value <= 100:
            raise RenderError(
                f"reasoning_effort must be within 1-100, got {value}", param="reasoning_effort"
            )
        return value
    if not isinstance(value, str) or value not in EFFORT_TIERS:
        raise RenderError(
            f"reasoning_effort must be one of {['none', *EFFORT_TIERS]}, got {value!r}",
            param="reasoning_effort",
        )
    return EFFORT_TIER_OVERRIDES.get(dialect, {}).get(value, EFFORT_TIERS[value])


# ---------------------------------------------------------------------------------------
# Tools and tool choice


# The checked and normalized tools of a request, cached by content: an agent sends the same
# tools every turn, and checking them (strict schemas included) and copying every schema is
# most of the rest of a short request's rendering. The key is `marshal` (format 2) of the
# request's `tools` and `tool_choice` (see dsml.render's tools-section cache for why
# marshal: plain data only, types and order kept, no back-references); what is stored is
# marshal of the result, the tools as offered (`{"type": "function", "function": ...}`), and
# of the tool choice. Every request, a hit included, gets its own fresh copy (marshal.loads
# builds new objects), so neither the caller's dicts nor anything a later consumer of
# `Prompt.tools` does can change what the cache holds. The stored bytes of the offered
# tools are also the key of their rendered section (dsml.render), so a hit computes no
# other key. Errors are not cached.
TOOLS_CACHE_MAX_ENTRIES = 256
TOOLS_CACHE_MAX_BYTES = 8_000_000  # keys + values, over all entries


TOOLS_CACHE: SizedLRU[bytes, tuple[bytes, bytes]] = SizedLRU(
    TOOLS_CACHE_MAX_ENTRIES, TOOLS_CACHE_MAX_BYTES
)


def _offered_tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any, bytes | None]:
    """The request's tools as offered (`[{"type": "function", "function": {name,
    description, parameters}}]`), its tool choice, and marshal of the offered tools (their
    tools-section cache key; None if they are not plain data). Cached by content
    (TOOLS_CACHE)."""
    raw, choice = body.get("tools"), body.get("tool_choice", "auto")
    try:
        key = marshal.dumps((raw, choice), 2)
    except (ValueError, TypeError, RecursionError):  # not plain data: uncached
        key = None
    value = TOOLS_CACHE.get(key) if key is not None else None
    if value is None:
        tools, choice = _check_tools(body)
        offered = [{"type": "function", "function": t} for t in tools]
        try:
            value = marshal.dumps(offered, 2), marshal.dumps(choice, 2)
        except (ValueError, TypeError, RecursionError):
            return offered, choice, None
        if key is not None:
            TOOLS_CACHE.put(key, value, len(key) + len(value[0]) + len(value[1]))
    # What a hit returns, also the first time: fresh objects.
    return marshal.loads(value[0]), marshal.loads(value[1]), value[0]


def _check_tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    raw = body.get("tools") or []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise RenderError("tools must be a list", param="tools")
    tools = [_tool(tool, f"tools[{k}]") for k, tool in enumerate(raw)]
    choice = body.get("tool_choice", "auto")
    names = {t["name"] for t in tools}
    if choice in ("auto", "none"):
        return tools, choice
    if choice == "required":
        if not tools:
            raise RenderError('tool_choice "required" needs tools', param="tool_choice")
        return tools, choice
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if not isinstance(function, Mapping) or choice.get("type", "function") != "function":
        raise RenderError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if not isinstance(function.get("name"), str) or function["name"] not in names:
        raise RenderError(
            f"tool_choice names an undeclared tool {function.get('name')!r}",
            param="tool_choice.function.name",
        )
    # A named choice offers that tool alone, as DeepSeek's request layer renders it.
    chosen = [t for t in tools if t["name"] == function["name"]][:1]
    return chosen, {"type": "function", "function": {"name": function["name"]}}


def check_tool_name(name: Any, param: str) -> str:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise RenderError(
            f"{param}: tool names must match ^[a-zA-Z0-9_.-]{{1,64}}$, got {name!r}", param=param
        )
    return name


def _tool(tool: Any, param: str) -> dict[str, Any]:
    """The function as the model reads it: name, description, parameters, in that order."""
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise RenderError(f'{param} must be a {{"type": "function"}} tool', param=f"{param}.type")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise RenderError(f"{param}.function must be an object", param=f"{param}.function")
    name = check_tool_name(function.get("name"), f"{param}.function.name")
    description = function.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise RenderError(
            f"{param}.function.description must be a string", param=f"{param}.function.description"
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        raise RenderError(
            f"{param}.function.parameters must be an object", param=f"{param}.function.parameters"
        )
    _check_schema(parameters, f"{param}.function.parameters", name)
    if function.get("strict"):
        parameters = strict_schema(parameters, f"{param}.function.parameters")
    return {"name": name, "description": description, "parameters": _copy_json(parameters)}


def json_depth(value: Any, limit: int) -> int:
    """How deep objects and arrays nest in `value`, counted up to `limit + 1` (iterative:
    the value may be deeper than Python's recursion limit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_schema(parameters: Mapping[str, Any], param: str, tool: str) -> None:
    """Refuse a schema too deep to handle, or with a pattern RE2 cannot match (400)."""
    if json_depth(parameters, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise RenderError(f"{param}: the parameters of tool {tool!r} nest more than "
                          f"{MAX_SCHEMA_DEPTH} objects/arrays deep", param=param)
    problem = schema_pattern_error(parameters, param)
    if problem is not None:
        where, keyword, message = problem
        raise RenderError(f"{where}: tool {tool!r}: {keyword} is not supported: {message} "
                          "(patterns run on RE2: no backreferences or lookaround)", param=where)


def _copy_json(value: Any) -> Any:
    """A deep copy of JSON-shaped data (what `copy.deepcopy` gives, about 4x faster: the
    schema of every tool is copied on every request). Other types go to `copy.deepcopy`."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict:
        return {k: _copy_json(v) for k, v in value.items()}
    if kind is list:
        return [_copy_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _copy_json(v) for k, v in value.items()}
    return copy.deepcopy(value)


# Keywords whose values are schemas / lists of schemas / maps of schemas.
_SUBSCHEMA = ("items", "not", "contains", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("$defs", "definitions", "patternProperties")


def strict_schema(schema: Mapping[str, Any], param: str) -> dict[str, Any]:
    """OpenAI's strict rules, checked; `additionalProperties: false` added to every object.

    Every object must list all of its properties in `required` and may not allow additional
    properties. The key order becomes `..., properties, additionalProperties, required, ...`
    (how DeepSeek's request layer renders strict tools).
    """
    out: dict[str, Any] = {}
    is_object = "properties" in schema or schema.get("type") == "object"
    for key, value in schema.items():
        if is_object and key in ("additionalProperties", "required"):
            continue
        if key == "properties":
            if not isinstance(value, Mapping):
                raise RenderError(f"{param}.properties must be an object", param=param)
            out[key] = {
                name: strict_schema(sub, f"{param}.properties.{name}")
                if isinstance(sub, Mapping)
                else sub
                for name, sub in value.items()
            }
            _close_object(schema, out, param)
        elif key in _SUBSCHEMA and isinstance(value, Mapping):
            out[key] = strict_schema(value, f"{param}.{key}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [
                strict_schema(s, f"{param}.{key}[{k}]") if isinstance(s, Mapping) else s
                for k, s in enumerate(value)
            ]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {
                n: strict_schema(s, f"{param}.{key}.{n}") if isinstance(s, Mapping) else s
                for n, s in value.items()
            }
        else:
            out[key] = copy.deepcopy(value)
        if key == "type" and is_object and "properties" not in schema:
            # An object without properties: nothing may be passed; say so explicitly.
            out["properties"] = {}
            _close_object(schema, out, param)
    if is_object and "additionalProperties" not in out:
        out["properties"] = out.get("properties", {})
        _close_object(schema, out, param)
    return out


def _close_object(schema: Mapping[str, Any], out: dict[str, Any], param: str) -> None:
    if schema.get("additionalProperties", False) is not False:
        raise RenderError(
            f"{param}: strict schemas may not allow additionalProperties", param=param
        )
    properties = list(schema.get("properties") or {})
    required = schema.get("required", [])
    if not isinstance(required, list) or sorted(map(str, required)) != sorted(properties):
        raise RenderError(
            f"{param}: strict schemas must list every property in required "
            f"(properties {properties}, required {required})",
            param=param,
        )
    out["additionalProperties"] = False
    out["required"] = list(required)


# ---------------------------------------------------------------------------------------
# Response format


def _response_format(body: Mapping[str, Any], dialect: Dialect) -> Any:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in text.lower() for text in _message_texts(body.get("messages"))):
            raise RenderError(
                "'messages' must contain the word 'json' in some form to use "
                "'response_format' of type 'json_object'",
                param="messages",
            )
        # DeepSeek's V4.1 encoding writes the request's format object as the schema; the
        # V4 one replaces the section with a fixed instruction.
        return {"type": "json_object"} if dialect == Dialect.V4_1 else JSON_OBJECT
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise RenderError(
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema",
            )
        return copy.deepcopy(dict(spec.get("schema", {}))) or None
    raise RenderError(
        'response_format.type must be "text", "json_object" or "json_schema"',
        param="response_format.type",
    )


def _format_constraint(body: Mapping[str, Any], rendered: Any) -> dict[str, Any] | None:
    """The request's `response_format` as the turn's grammar reads it (`Prompt.response_format`),
    from the body `_response_format` has already checked and what it returned. A json_schema
    whose schema is empty renders nothing, but still asks for JSON: any JSON value."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = rendered if isinstance(rendered, dict) else {}
        strict = bool(fmt["json_schema"].get("strict"))
        return {"type": "json_schema", "json_schema": {"schema": schema, "strict": strict}}
    return None


def _message_texts(messages: Any) -> list[str]:
    found = []
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if isinstance(content, str):
            found.append(content)
        elif isinstance(content, list):
            found += [
                p["text"]
                for p in content
                if isinstance(p, Mapping) and isinstance(p.get("text"), str)
            ]
    return found


# ---------------------------------------------------------------------------------------
# Messages


def _content_text(content: Any, param: str, *, allow_images: bool = False) -> str:
    """A string, or a list of text parts joined by blank lines (as DeepSeek's layer does)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RenderError(f"{param} must be a string or a list of content parts", param=param)
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in IMAGE_PART_TYPES:
            raise UnsupportedError(
                f"{param}[{k}]: image input is not supported by this model", param=f"{param}[{k}]"
            )
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RenderError(
                f"{param}[{k}]: unsupported content part type {kind!r}", param=f"{param}[{k}]"
            )
        texts.append(part["text"])
    return "\n\n".join(texts)


def _messages(raw: Any, dialect: Dialect) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise RenderError("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()  # ids of the latest assistant turn's tool calls
    for i, msg in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise RenderError(f"{param} must be an object", param=param)
        role = msg.get("role")
        content = msg.get("content")
        if msg.get("prefix") and (role != "assistant" or i != len(raw) - 1):
            raise RenderError(
                "prefix: true is only allowed on the last message, an assistant one",
                param=f"{param}.prefix",
            )
        if role in ("system", "developer"):
            text = _content_text(content, f"{param}.content")
            if text:  # an empty instruction is no instruction (DeepSeek's layer drops it too)
                out.append({"role": "system", "content": text})
        elif role == "user":
            out.append({"role": "user", "content": _content_text(content, f"{param}.content")})
        elif role == "latest_reminder" and dialect != Dialect.V3_2:
            out.append(
                {"role": "latest_reminder", "content": _content_text(content, f"{param}.content")}
            )
        elif role == "assistant":
            assistant = _assistant(msg, param)
            call_ids = {call["id"] for call in assistant.get("tool_calls", [])}
            out.append(assistant)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise RenderError(
                    f"{param}.tool_call_id {call_id!r} answers no tool call of the preceding assistant message",
                    param=f"{param}.tool_call_id",
                )
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": _content_text(content, f"{param}.content"),
                }
            )
        else:
            raise RenderError(f"{param}.role: unknown role {role!r}", param=f"{param}.role")
    return out


def _assistant(msg: Mapping[str, Any], param: str) -> dict[str, Any]:
    reasoning = msg.get("reasoning_content")
    if reasoning is None:
        reasoning = msg.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RenderError(
            f"{param}.reasoning_content must be a string", param=f"{param}.reasoning_content"
        )
    out: dict[str, Any] = {
        "role": "assistant",
        "content": _content_text(msg.get("content"), f"{param}.content"),
        "reasoning_content": reasoning,
    }
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RenderError(f"{param}.tool_calls must be a list", param=f"{param}.tool_calls")
    if calls and msg.get("prefix"):
        raise RenderError(
            "a prefix assistant message cannot carry tool calls", param=f"{param}.tool_calls"
        )
    if calls:
        out["tool_calls"] = [
            _tool_call(call, f"{param}.tool_calls[{k}]") for k, call in enumerate(calls)
        ]
    if msg.get("prefix"):
        out["prefix"] = True
    return out


def _tool_call(call: Any, param: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or call.get("type", "function") != "function":
        raise RenderError(
            f'{param} must be a {{"type": "function", "function": ...}} call', param=param
        )
    call_id = call.get("id", "")
    if not isinstance(call_id, str):
        raise RenderError(f"{param}.id must be a string", param=f"{param}.id")
    name = check_tool_name(function.get("name"), f"{param}.function.name")
    if "arguments" not in function:
        raise RenderError(
            f"{param}.function.arguments is missing", param=f"{param}.function.arguments"
        )
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": function["arguments"]},
    }
