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
  tools) forbids DSML; `parallel_tool_calls: false` allows one invoke.
- `response_format` json_schema / json_object makes the content JSON and nothing else
  (`answer_schema`): valid under the schema as llguidance enforces one (`strict` adds
  `additionalProperties: false` to every object; properties come in the schema's order; an
  empty schema is any JSON value), or an object of any JSON; after the reasoning in thinking
  mode. Its strings may hold nothing the parser would act on (NO_MARKUP_PATTERN; keys of
  properties the schema leaves free are not constrained: patterned keys cost 2.5x the mask
  time). Whitespace between its tokens is one bounded run (ANSWER_WHITESPACE). A turn whose
  tool choice allows calls may write a block instead of the answer (no content before it).

String parameters (`string="true"`, raw text). `minLength` / `maxLength` bound the value and
`pattern` must match in it: the pattern becomes a Lark regex (`search_regex`: llguidance's
`regex_to_lark`, then JSON Schema's search semantics spelled out around each branch), and
the value is that regex, and the length bound, and no "DSML", as one lexeme with its closer.
A pattern llguidance cannot compile (lookaround, `\\b`, multi-line anchors) or whose anchors
sit where `search_regex` cannot place them makes the grammar fail to build or validate, and
the proxy leaves the turn unconstrained (proxy.backends.constraints) rather than fail it.
`format` is not enforced on raw values: llguidance's format regexes live inside its JSON
compiler (a `%json` string is quoted, a raw value is not) and are not reachable from Lark,
and the parser's validator treats `format` as an annotation (jsonschema without a format
checker), so a hand-written regex per format could only refuse values the proxy delivers as
valid. (In JSON values, non-string parameters and the answer, llguidance enforces the formats
it knows; one it does not know is dropped from the schema it gets, `_known_formats_only`:
left in, it would fail the grammar and the turn would go unconstrained.)

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
import functools
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher, grammar_from, regex_to_lark

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
    return _map_subschemas(out, _no_markup_in_strings, _SUBSCHEMA_LISTS)


def _map_subschemas(out: dict, fn, lists: Sequence[str]) -> dict:
    """`out` with fn applied to each subschema under `lists`, the maps and items /
    additionalProperties (the walk both markup rewrites share)."""
    for key in lists:
        if isinstance(out.get(key), list):
            out[key] = [fn(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: fn(s) for k, s in out[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), Mapping):
            out[key] = fn(out[key])
    return out


def avoiding_pattern(words: Sequence[str]) -> str:
    """A regex without lookaround (a JSON `pattern`) matching exactly the strings that hold
    none of `words`. Each word must begin with a character that no word holds anywhere else
    (true of FORBIDDEN_IN_TEXT: "D" and "<"), so that every occurrence of a word starts one
    of the pieces the string splits into before each such character, at that piece's start:
    the string is its text before the first of them, then pieces that each begin with one
    and hold no other, none starting with a word. A piece is read down the trie of the words
    that begin with its character; it may stop anywhere, or leave the trie on a character
    that continues no word, but never complete one."""
    starts = sorted({w[0] for w in words})
    if any(c in starts for w in words for c in w[1:]):
        raise ValueError("each word must begin with a character no word holds elsewhere")
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here
    def chars(cs: Any) -> str:
        return "".join(_regex_escape(c) for c in sorted(cs))
    free = f"[^{chars(starts)}]*"

    def rest(node: dict[str, Any]) -> str:
        alts = [f"[^{chars(set(starts) | (node.keys() - {''}))}]{free}"]
        alts += [_regex_escape(ch) + rest(sub) for ch, sub in node.items() if ch and "" not in sub]
        return "(?:" + "|".join(alts) + ")?"

    pieces = "|".join(_regex_escape(ch) + rest(trie[ch]) for ch in starts if "" not in trie[ch])
    return f"^{free}(?:{pieces})*$"


# JSON strings in a JSON answer (response_format) are content: they may hold nothing the
# parser would act on (FORBIDDEN_IN_TEXT), as free content may not.
NO_MARKUP_PATTERN = avoiding_pattern(FORBIDDEN_IN_TEXT)
# Whitespace between the tokens of a JSON answer: one run of spaces/tabs, or a newline and an
# indent, bounded, so that an answer may be pretty-printed but a constrained model cannot pad
# it forever (llguidance's default whitespace is unbounded, and the skip matches once).
ANSWER_WHITESPACE = r"[ \t]{1,16}|\r?\n[ \t]{0,64}"
# `json_object`: an object of any JSON, its strings (not its keys) without markup.
_ANY_DEF = "dsml-proxy-any"
_ANY_REF = {"$ref": f"#/$defs/{_ANY_DEF}"}
JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "$defs": {_ANY_DEF: {"anyOf": [
        {"type": "string", "pattern": NO_MARKUP_PATTERN}, {"type": "number"},
        {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": _ANY_REF},
        {"type": "object", "additionalProperties": _ANY_REF},
    ]}},
    "type": "object",
    "additionalProperties": _ANY_REF,
}


def _no_markup_in_answer(schema: Any) -> Any:
    """`schema` with NO_MARKUP_PATTERN on every string schema it spells out (not enum or
    const ones: their values are the client's); a string with its own pattern gets both."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    kind = out.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if is_string and not {"enum", "const"} & out.keys():
        if "pattern" in out:
            out = {"allOf": [out, {"pattern": NO_MARKUP_PATTERN}]}
        else:
            out["pattern"] = NO_MARKUP_PATTERN
        return out
    return _map_subschemas(out, _no_markup_in_answer, (*_SUBSCHEMA_LISTS, "allOf"))


def answer_schema(fmt: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema a response_format makes the content follow, as llguidance gets it."""
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") or {}
        if spec.get("strict"):
            schema = _strictify(schema)
        schema = _no_markup_in_answer(_known_formats_only(schema))
    else:  # json_object
        schema = JSON_OBJECT_SCHEMA
    return {**schema, "x-guidance": {"whitespace_pattern": ANSWER_WHITESPACE}}


# -- JSON-Schema `pattern` on raw string values -------------------------------------------------

_FLAG_GROUP = re.compile(r"\(\?[a-zA-Z-]*\)")


def _anchors_and_branches(rx: str) -> tuple[list[tuple[int, int, int]], list[int], bool]:
    """In a Lark-ready regex: its anchors (position, length, group depth) outside character
    classes, the positions of its top-level `|`, and whether a bare flag group `(?i)` sits at
    the top level."""
    anchors: list[tuple[int, int, int]] = []
    bars: list[int] = []
    top_flags = False
    depth = in_class = i = 0
    n = len(rx)
    while i < n:
        ch = rx[i]
        if ch == "\\":
            nxt = rx[i + 1:i + 2]
            if not in_class and nxt in ("A", "z"):
                anchors.append((i, 2, depth))
            if nxt in ("x", "p", "P") and rx[i + 2:i + 3] == "{":
                end = rx.find("}", i)
                i = n if end < 0 else end + 1
            else:
                i += 2
            continue
        if in_class:
            if ch == "[" and rx.startswith("[:", i) and (end := rx.find(":]", i + 2)) >= 0:
                i = end + 2
                continue
            in_class += {"[": 1, "]": -1}.get(ch, 0)
            i += 1
            continue
        if ch == "[":
            in_class = 1
            i += 1
            if rx[i:i + 1] == "^":
                i += 1
            if rx[i:i + 1] == "]":  # a literal "]" first in the class
                i += 1
            continue
        if ch == "(":
            top_flags = top_flags or (depth == 0 and bool(_FLAG_GROUP.match(rx, i)))
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            bars.append(i)
        elif ch in "^$":
            anchors.append((i, 1, depth))
        i += 1
    return anchors, bars, top_flags


def _is_start(rx: str, pos: int) -> bool:
    return rx[pos] == "^" or rx.startswith("\\A", pos)


def search_regex(pattern: str) -> str:
    """A Lark regex (the text inside `/.../`) matching exactly the strings in which JSON
    Schema's unanchored `pattern` finds a match. The pattern goes through llguidance's own
    `regex_to_lark` (with `\\d`, `\\w`, `\\s` ASCII, as RE2 reads them: the parser validates
    values with RE2, dsml.patterns); then each top-level branch is wrapped in `(?s:.*)` on the
    sides it is not anchored (`^`/`\\A` first, `$`/`\\z` last; RE2's `$` is the text's end).
    ValueError for anchors elsewhere (inside a group, mid-branch) or a top-level flag group
    in a pattern with anchors and branches: the caller leaves the turn unconstrained."""
    rx = regex_to_lark(pattern, "dws")
    anchors, bars, top_flags = _anchors_and_branches(rx)
    if not anchors:
        return f"(?s:.*)(?:{rx})(?s:.*)"
    if any(depth for _, _, depth in anchors) or (bars and top_flags):
        raise ValueError(f"pattern {pattern!r}: anchors only at the ends of top-level branches")
    out = []
    bounds = [-1, *bars, len(rx)]
    for lo, hi in itertools.pairwise(bounds):
        start, end = lo + 1, hi
        inside = [(pos, size) for pos, size, _ in anchors if start <= pos < end]
        head = tail = False
        if inside and inside[0][0] == start and _is_start(rx, inside[0][0]):
            head, start = True, start + inside[0][1]
            inside = inside[1:]
        if inside and inside[-1][0] + inside[-1][1] == end and not _is_start(rx, inside[-1][0]):
            tail, end = True, inside[-1][0]
            inside = inside[:-1]
        if inside:
            raise ValueError(f"pattern {pattern!r}: an anchor inside a branch")
        out.append(("" if head else "(?s:.*)") + f"(?:{rx[start:end]})"
                   + ("" if tail else "(?s:.*)"))
    return "|".join(out) if len(out) == 1 else "(?:" + "|".join(out) + ")"


# Keywords whose values are instances, not schemas: a "format" key inside them is data.
_INSTANCE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


@functools.lru_cache(maxsize=256)  # format names come from clients: bounded
def _llguidance_knows_format(name: str) -> bool:
    grammar = grammar_from("json_schema", json.dumps({"type": "string", "format": name}))
    return LLMatcher.validate_grammar(grammar) == ""


def _known_formats_only(schema: Any) -> Any:
    """`schema` without the `format`s llguidance does not know (`uri-reference`, OpenAPI's
    `int32`, `byte`...): one of them fails the whole grammar and the turn would go
    unconstrained, while the parser's validator treats `format` as an annotation anyway, so
    dropping it costs nothing the proxy checks."""
    if isinstance(schema, list):
        return [_known_formats_only(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "format" and isinstance(value, str):
            if _llguidance_knows_format(value):
                out[key] = value
        else:
            out[key] = value if key in _INSTANCE_KEYWORDS else _known_formats_only(value)
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
        (in code points, as JSON Schema counts) and `pattern` must match in it (search, as
        JSON Schema reads it: `search_regex`); such a value is text only."""
        lo = schema.get("minLength") if isinstance(schema, Mapping) else None
        hi = schema.get("maxLength") if isinstance(schema, Mapping) else None
        pattern = schema.get("pattern") if isinstance(schema, Mapping) else None
        lo = lo if isinstance(lo, int) and not isinstance(lo, bool) and lo >= 0 else None
        hi = hi if isinstance(hi, int) and not isinstance(hi, bool) and hi >= 0 else None
        pattern = pattern if isinstance(pattern, str) else None
        if lo is None and hi is None and pattern is None:
            return self.text(self.param_close, value=True)
        words = "|".join(_regex_escape(w) for w in FORBIDDEN_IN_VALUE)
        parts = []
        if lo is not None or hi is not None:
            parts.append(f"/(?s:.{{{lo or 0},{'' if hi is None else hi}}})/")
        if pattern is not None:
            parts.append(f"/{search_regex(pattern)}/")
        body = " & ".join([*parts, f"~/(?s:.*({words}).*)/"])
        return self.b.lexeme(f"({body}) {_lark_str(self.param_close)}")

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
        return _json_schema_text(_no_markup_in_strings(_known_formats_only(schema)))

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
            # The answer is JSON and nothing else (no text around it, none before a block);
            # a turn the tool choice lets call may still call instead of answering.
            if not forced:
                alts.append("%json " + json.dumps(answer_schema(fmt), ensure_ascii=False))
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
