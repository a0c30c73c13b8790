"""One grammar of the whole assistant turn, for constrained decoding (issue 16).

A request (tools, tool choice, parallel calls, thinking, response format) compiles to an
llguidance Lark grammar of what the model may write after the prompt, following dsml.md
section 5:

    THINKING := REASONING "</think>" CONTENT [ "\\n\\n" BLOCK ] EOS
    CHAT     :=                      CONTENT [ "\\n\\n" BLOCK ] EOS

- Reasoning and content are free text that cannot hold DSML or any other spelling the
  parser would act on (`FORBIDDEN_IN_TEXT`): a call can no longer be swallowed by thinking,
  and a call can only be made inside a real block.
- A block names declared tools only, their declared parameters in declared order (the order
  the reference encoder writes them), `string="true"` with raw text for string-typed
  parameters, `string="false"` with JSON valid against the parameter's schema for the others,
  every required parameter present. Nothing but EOS follows the block.
- `tool_choice` "required" / a named function forces a block / that tool; "none" (or no
  tools) forbids DSML; `parallel_tool_calls: false` allows one invoke; `response_format`
  json_schema / json_object makes the content JSON of that schema.

The turn runner generates in phases (reasoning up to `</think>`, then the forced opener,
then the block), so a grammar starts at a `Phase`: `phase_of` tells which from the text the
turn has produced so far. Grammars are cached per request shape (`compile_turn`).

Lexemes. llguidance lexes greedily, so free text followed by a literal that free text
could also begin (`\\n\\n<｜DSML｜tool_calls>`, `</｜DSML｜parameter>`) is written as one
lexeme with its terminator; `</think>` is a special token to llguidance (it marks every
`<...>`-looking added token special), so it is written by id, and EOS is the matcher's own.
`｜DSML｜` is an ordinary text token to it, matched as text.

Only the V4 tokenizer's dialects (v4, v4-0731) are compiled: the grammar names `</think>`
by its V4 id.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsml import markers
from dsml.dialects import Dialect
from dsml.lru import SizedLRU
from dsml.tokenizer import EXPECTED_CONTROL_IDS

THINK_CLOSE_ID = 128822  # dsml.md section 1; checked against the tokenizer in the tests
GRAMMAR_DIALECTS = frozenset({Dialect.V4, Dialect.V4_0731})

# Substrings free text (reasoning, content, string values) may not contain: every spelling of
# the DSML token the parser tolerates has "DSML" in it; `</think>` / `<think>` as text would
# move the parser between reasoning and content; EOS as text ends the turn; the bare
# `<invoke`/`<tool_calls`/`<function_calls` tags (dsml.md 6.1 rule 9) can become calls.
FORBIDDEN_IN_TEXT = (
    "DSML",
    markers.THINK_CLOSE,
    markers.THINK_OPEN,
    markers.EOS,
    "<invoke",
    "<tool_call",
    "<function_call",
    "<tool_use",
)
# String values end at their closer; they may hold `</think>` and the like (the parser
# takes the value raw), but never "DSML" (markup in a value).
FORBIDDEN_IN_VALUE = ("DSML",)

# Added tokens llguidance treats as special (not text), by id: free text may hold them
# (the parser takes them as text), except the turn's own markup: `<think>`, `</think>`,
# `｜DSML｜` (text to llguidance anyway), `<dsml:` / `</dsml:`, DeepSeek-V3's tool-call tokens, BOS, EOS.
# String values may hold `<think>` / `</think>`. Ids stop at the model's vocabulary.
SPECIALS_IN_TEXT = "128000-128805,128815-128820,128823-128824,128826-128839,128842-129279"
SPECIALS_IN_VALUE = "128000-128805,128815-128824,128826-128839,128842-129279"


class Phase(enum.StrEnum):
    TURN = "turn"  # right after the generation prompt
    REASONING = "reasoning"  # reasoning up to `</think>` only (a forced turn's first phase)
    CONTENT = "content"  # after `</think>`
    BLOCK = "block"  # after the block opener: invokes
    INVOKE = "invoke"  # after a named invoke's opener: that invoke's parameters, then more


@dataclass(frozen=True, slots=True)
class TurnSpec:
    """What the grammar depends on, normalised (hashable: the cache key)."""

    tools_json: str  # json.dumps of the offered tools (after tool_choice none -> []), key order kept: it is the parameter order
    tool_choice: str  # "auto" | "none" | "required" | "function:<name>"
    parallel_tool_calls: bool
    thinking: bool
    response_format_json: str  # "" | json.dumps of the response_format object
    phase: Phase
    invoke_name: str = ""  # with Phase.INVOKE


def _choice_key(tool_choice: Any) -> str:
    if isinstance(tool_choice, Mapping):
        if tool_choice.get("type") == "allowed_tools":
            mode = (tool_choice.get("allowed_tools") or {}).get("mode")
            return "required" if mode == "required" else "auto"
        name = (tool_choice.get("function") or {}).get("name")
        return f"function:{name}" if name else "auto"
    return tool_choice if tool_choice in ("none", "required") else "auto"


def turn_spec(tools: Sequence[Mapping[str, Any]], *, tool_choice: Any = "auto",
              parallel_tool_calls: bool = True, thinking: bool = False,
              response_format: Mapping[str, Any] | None = None,
              phase: Phase = Phase.TURN, invoke_name: str = "") -> TurnSpec:
    choice = _choice_key(tool_choice)
    fmt = response_format if response_format and response_format.get("type") != "text" else None
    return TurnSpec(
        tools_json=json.dumps(list(tools) if choice != "none" else [], ensure_ascii=False),
        tool_choice=choice,
        parallel_tool_calls=parallel_tool_calls,
        thinking=thinking,
        response_format_json=json.dumps(fmt, ensure_ascii=False) if fmt else "",
        phase=phase,
        invoke_name=invoke_name,
    )


def phase_of(generated: str, *, thinking: bool, forced: str) -> tuple[Phase, str] | None:
    """The phase a generation starts in, from the model-side text so far (forced text
    included) and the forced opener of the turn ("" when the model may choose). None: a
    state no grammar starts from (the caller generates unconstrained)."""
    if not generated:
        if forced and thinking:
            return Phase.REASONING, ""
        return Phase.TURN, ""
    if forced and generated.endswith(forced):
        _head, sep, rest = forced.partition(f"<{markers.DSML}{markers.INVOKE} name=\"")
        if sep:
            return Phase.INVOKE, rest[: rest.rindex('"')]
        return Phase.BLOCK, ""
    if generated.endswith(markers.THINK_CLOSE):
        return Phase.CONTENT, ""
    return None


# -- Lark text -------------------------------------------------------------------------------


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append("\\" + ch if ch in r"\.+*?()|[]{}^$#&-~/" else ch)
    return "".join(out)


def _free_text_regex(forbidden: Sequence[str]) -> str:
    """A lexeme body: any text (newlines included) holding none of `forbidden`."""
    words = "|".join(_regex_escape(w) for w in forbidden)
    return f"/(?s:.*)/ & ~/(?s:.*({words}).*)/"


# Control strings llguidance takes as special tokens: a literal holding one (an enum member
# "<｜User｜>") is written with the token's id there.
_SPECIAL_LITERALS = {text: i for text, i in EXPECTED_CONTROL_IDS.items() if text != markers.DSML}
_SPECIAL_RE = re.compile("|".join(map(re.escape, _SPECIAL_LITERALS)))


def _literal(text: str) -> str:
    """A Lark sequence matching `text` as the model's tokens spell it."""
    parts, pos = [], 0
    for m in _SPECIAL_RE.finditer(text):
        if m.start() > pos:
            parts.append(_lark_str(text[pos:m.start()]))
        parts.append(f"<[{_SPECIAL_LITERALS[m.group()]}]>")
        pos = m.end()
    if pos < len(text) or not parts:
        parts.append(_lark_str(text[pos:]))
    return " ".join(parts)


def _tag(name: str) -> str:
    return f"<{markers.DSML}{name}"


def _closer(name: str) -> str:
    return f"</{markers.DSML}{name}>"


def _is_string_only(schema: Mapping[str, Any]) -> bool | None:
    """True: a string (string="true"); False: never a string (JSON); None: either."""
    if not isinstance(schema, Mapping):
        return None
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        kinds = {isinstance(v, str) for v in schema["enum"]}
        return kinds.pop() if len(kinds) == 1 else None
    if "const" in schema:
        return isinstance(schema["const"], str)
    kind = schema.get("type")
    if kind == "string":
        return True
    if isinstance(kind, str):
        return False
    if isinstance(kind, list) and kind:
        return None if "string" in kind else False
    return None


# JSON values are written the way the reference encoder writes them (json.dumps: ", " and
# ": ", no other whitespace): the model was trained on that, and a constrained model cannot
# pad a value with whitespace forever.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_schema_text(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_FORMAT}, ensure_ascii=False)


# JSON strings inside non-string values may not hold "DSML" either: the parser would cut the
# value at a `</｜DSML｜parameter>` inside it. A regex without lookaround (llguidance's JSON
# `pattern`) for "no DSML anywhere"; tests/dsml/test_grammar.py checks it exhaustively on
# short strings.
NO_DSML_PATTERN = r"^(?:[^D]|D(?:D|SD|SMD)*(?:[^DS]|S[^DM]|SM[^DL]))*(?:D(?:D|SD|SMD)*(?:S|SM)?)?$"
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def _no_markup_in_strings(schema: Any) -> Any:
    """`schema` with NO_DSML_PATTERN on every string that has no pattern, enum or const."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    kind = out.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if is_string and not {"pattern", "enum", "const", "format"} & out.keys():
        out["pattern"] = NO_DSML_PATTERN
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_no_markup_in_strings(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: _no_markup_in_strings(s) for k, s in out[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), Mapping):
            out[key] = _no_markup_in_strings(out[key])
    return out


def _strictify(schema: Any) -> Any:
    """OpenAI strict semantics: no property beyond those listed, in every object."""
    if isinstance(schema, list):
        return [_strictify(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _strictify(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class _Builder:
    """Collects rules and lexemes; names are positional, so the text is deterministic."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lexemes: dict[str, str] = {}

    def rule(self, name: str, body: str) -> str:
        self.lines.append(f"{name}: {body}")
        return name

    def lexeme(self, body: str) -> str:
        name = self._lexemes.get(body)
        if name is None:
            name = f"L{len(self._lexemes)}"
            self._lexemes[body] = name
            self.lines.append(f"{name}: {body}")
        return name


class _TurnGrammar:
    def __init__(self, spec: TurnSpec) -> None:
        self.spec = spec
        self.tools = [t.get("function", t) for t in json.loads(spec.tools_json)]
        self.b = _Builder()
        self.param_close = _closer(markers.PARAMETER)
        self._rests: dict[int, str] = {}

    def text_lexeme(self, suffix: str = "", forbidden: Sequence[str] = FORBIDDEN_IN_TEXT) -> str:
        free = f"({_free_text_regex(forbidden)})"
        body = free if not suffix else f"{free} {_lark_str(suffix)}"
        return self.b.lexeme(body)

    def text(self, suffix: str = "", *, value: bool = False) -> str:
        """Free text, special tokens between its pieces, then `suffix`: the last piece and
        the suffix are one lexeme (see the module doc). Without a suffix the text may be
        empty."""
        forbidden = FORBIDDEN_IN_VALUE if value else FORBIDDEN_IN_TEXT
        specials = SPECIALS_IN_VALUE if value else SPECIALS_IN_TEXT
        piece = self.text_lexeme("", forbidden)
        last = self.text_lexeme(suffix, forbidden) if suffix else f"{piece}?"
        return f"({piece}? <[{specials}]>)* {last}"

    def string_value(self, schema: Any) -> str:
        """A raw string value then the parameter closer. `minLength` / `maxLength` bound it
        (in code points, as JSON Schema counts); a bounded value is text only."""
        lo = schema.get("minLength") if isinstance(schema, Mapping) else None
        hi = schema.get("maxLength") if isinstance(schema, Mapping) else None
        lo = lo if isinstance(lo, int) and not isinstance(lo, bool) and lo >= 0 else None
        hi = hi if isinstance(hi, int) and not isinstance(hi, bool) and hi >= 0 else None
        if lo is None and hi is None:
            return self.text(self.param_close, value=True)
        words = "|".join(_regex_escape(w) for w in FORBIDDEN_IN_VALUE)
        bounded = f"/(?s:.{{{lo or 0},{'' if hi is None else hi}}})/ & ~/(?s:.*({words}).*)/"
        return self.b.lexeme(f"({bounded}) {_lark_str(self.param_close)}")

    # -- the block --

    def json_value(self, schema: Any, defs: Mapping[str, Any], strict: bool) -> str:
        if not isinstance(schema, Mapping):
            schema = {}
        schema = dict(schema)
        for key in ("$defs", "definitions"):
            if key in defs and key not in schema:
                schema[key] = defs[key]
        if strict:
            schema = _strictify(schema)
        return _json_schema_text(_no_markup_in_strings(schema))

    def param(self, tool_index: int, index: int, key: str, schema: Any,
              defs: Mapping[str, Any], strict: bool) -> str:
        kinds = _is_string_only(schema)
        alts = []
        if kinds in (True, None):
            opener = _lark_str(f'{_tag(markers.PARAMETER)} name="{key}" string="true">')
            values = schema.get("enum") if isinstance(schema, Mapping) else None
            if isinstance(schema, Mapping) and "const" in schema:
                values = [schema["const"]]
            # A member holding DSML cannot be written (markup in a value).
            strings = [v for v in values or () if isinstance(v, str) and "DSML" not in v]
            if strings and kinds is True:
                choices = " | ".join(f"({_literal(v)})" for v in strings)
                alts.append(f"{opener} ({choices}) {_lark_str(self.param_close)}")
            else:
                alts.append(f"{opener} {self.string_value(schema)}")
        if kinds in (False, None):
            opener = _lark_str(f'{_tag(markers.PARAMETER)} name="{key}" string="false">')
            value = self.json_value(schema, defs, strict)
            alts.append(f"{opener} {value} {_lark_str(self.param_close)}")
        # Each parameter carries its trailing newline (dsml.md 5: joined by "\n", then
        # "\n</｜DSML｜invoke>").
        body = " | ".join(f"({a}) \"\\n\"" for a in alts)
        return self.b.rule(f"p{tool_index}_{index}", body)

    def params(self, tool_index: int, function: Mapping[str, Any]) -> str:
        parameters = function.get("parameters") or {}
        props = parameters.get("properties") or {}
        required = set(parameters.get("required") or ())
        strict = bool(function.get("strict"))
        items = [(self.param(tool_index, i, key, schema, parameters, strict), key in required)
                 for i, (key, schema) in enumerate(props.items())]
        n = len(items)
        # tail_i: the in-order subsequences of items[i:] holding every required one;
        # some_i: the non-empty ones (for a tool without required parameters).
        for i in range(n, -1, -1):
            if i == n:
                self.b.rule(f"tail{tool_index}_{i}", '""')
                continue
            name, needed = items[i]
            nxt = f"tail{tool_index}_{i + 1}"
            body = f"{name} {nxt}" if needed else f"{name} {nxt} | {nxt}"
            self.b.rule(f"tail{tool_index}_{i}", body)
        if any(needed for _, needed in items):
            return f"tail{tool_index}_0"
        for i in range(n - 1, -1, -1):
            name, _ = items[i]
            alts = [f"{name} tail{tool_index}_{i + 1}"]
            if i + 1 < n:
                alts.append(f"some{tool_index}_{i + 1}")
            self.b.rule(f"some{tool_index}_{i}", " | ".join(alts))
        empty = '"\\n"'
        return self.b.rule(f"params{tool_index}", f"{empty} | some{tool_index}_0" if n else empty)

    def invoke_rest(self, tool_index: int) -> str:
        """An invoke after its opener's `">\\n`: parameters, then the invoke closer."""
        if (rest := self._rests.get(tool_index)) is None:
            params = self.params(tool_index, self.tools[tool_index])
            rest = self.b.rule(f"rest{tool_index}",
                               f"{params} {_lark_str(_closer(markers.INVOKE))}")
            self._rests[tool_index] = rest
        return rest

    def invoke(self, tool_index: int, lead: str) -> str:
        """An invoke; `lead` ("" or "\\n") is written into its opener's lexeme, so that the
        newline between two invokes and the one before the block closer are not two
        lexemes that begin alike."""
        name = self.tools[tool_index]["name"]
        opener = _lark_str(f'{lead}{_tag(markers.INVOKE)} name="{name}">\n')
        return self.b.rule(f"invoke{tool_index}_{len(lead)}",
                           f"{opener} {self.invoke_rest(tool_index)}")

    def tool_indexes(self) -> list[int]:
        choice = self.spec.tool_choice
        names = [t["name"] for t in self.tools]
        if choice.startswith("function:"):
            return [i for i, n in enumerate(names) if n == choice[len("function:"):]]
        return list(range(len(names)))

    def block_body(self, first: str | None = None) -> str:
        """Invokes then the block closer; `first` is an invoke already begun."""
        close = _lark_str("\n" + _closer(markers.TOOL_CALLS))
        head = first or self.b.rule(
            "any_invoke", " | ".join(self.invoke(i, "") for i in self.tool_indexes()))
        if not self.spec.parallel_tool_calls:
            return self.b.rule("block_body", f"{head} {close}")
        more = self.b.rule(
            "more_invoke", " | ".join(self.invoke(i, "\n") for i in self.tool_indexes()))
        return self.b.rule("block_body", f"{head} {more}* {close}")

    # -- content --

    def content(self) -> str:
        calls_allowed = bool(self.tools) and self.spec.tool_choice != "none"
        forced = calls_allowed and self.spec.tool_choice != "auto"
        opener = f"\n\n{_tag(markers.TOOL_CALLS)}>\n"
        fmt = json.loads(self.spec.response_format_json or "null")
        alts = []
        if fmt is not None:
            if fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema") or {}
                if (fmt.get("json_schema") or {}).get("strict"):
                    schema = _strictify(schema)
            else:
                schema = {"type": "object"}
            if not forced:
                # An answer may be pretty-printed: whitespace as JSON allows.
                alts.append("%json " + json.dumps(schema, ensure_ascii=False))
            if calls_allowed:
                alts.append(f"{_lark_str(opener)} {self.block_body()}")
        else:
            if not forced:
                alts.append(self.text())
            if calls_allowed:
                alts.append(f"{self.text(opener)} {self.block_body()}")
        return self.b.rule("content", " | ".join(f"({a})" for a in alts))

    def reasoning(self) -> str:
        return self.b.rule("reasoning", f"{self.text()} <[{THINK_CLOSE_ID}]>")

    def start(self) -> str:
        phase = self.spec.phase
        if phase is Phase.TURN:
            body = f"{self.reasoning()} {self.content()}" if self.spec.thinking else self.content()
        elif phase is Phase.REASONING:
            body = self.reasoning()
        elif phase is Phase.CONTENT:
            body = self.content()
        elif phase is Phase.BLOCK:
            body = self.block_body()
        else:
            names = [t["name"] for t in self.tools]
            if self.spec.invoke_name not in names:
                raise ValueError(f"no tool named {self.spec.invoke_name!r}")
            body = self.block_body(first=self.invoke_rest(names.index(self.spec.invoke_name)))
        self.b.lines.insert(0, f"start: {body}")
        return "%llguidance {}\n" + "\n".join(self.b.lines) + "\n"


def build_lark(spec: TurnSpec) -> str:
    """The grammar text of `spec` (uncached)."""
    return _TurnGrammar(spec).start()


GRAMMAR_CACHE_MAX_ENTRIES = 256
GRAMMAR_CACHE_MAX_CHARS = 8_000_000
_grammars: SizedLRU[TurnSpec, str] = SizedLRU(GRAMMAR_CACHE_MAX_ENTRIES, GRAMMAR_CACHE_MAX_CHARS)


def turn_lark(spec: TurnSpec) -> str:
    """The grammar text of `spec`, cached per request shape: agents resend the same tools."""
    text = _grammars.get(spec)
    if text is None:
        text = build_lark(spec)
        _grammars.put(spec, text, len(text) + len(spec.tools_json))
    return text
