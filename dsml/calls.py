"""Building one tool call: parameter values to JSON, coercion against the schema, outcomes.

The state machine (`dsml.parser` and its handler modules) decides *where* a value starts
and ends; this module decides *what* it is. A parameter's value mode is fixed when its
opener is read:

- `M_STR`: a string the schema allows (`string="true"`, or no attribute and a string
  type). It streams as JSON-escaped fragments while it arrives.
- `M_COERCE`: `string="true"` (or no attribute) where the schema types the parameter
  otherwise; held until the parameter closes, then coerced (dsml.md section 6).
- `M_JSON`: `string="false"`; held, then parsed with `loads_strict`.

Every fragment written into `Call.jparts` is part of `json.dumps(arguments,
ensure_ascii=False)`, so fragments are never retracted.
"""

from __future__ import annotations

import json
import random
import re
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from dsml.events import CallOutcome, RepairKind
from dsml.schema import ToolRegistry, ToolSchema, coerce_value, loads_strict, type_allows

# Value modes of a parameter.
M_STR, M_COERCE, M_JSON = range(3)

WRAPPERS = ("arguments", "input")
JUNK_ERROR = "unreadable text inside the invoke (returned as content)"
NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]').search
_RNG = random.Random()  # seeded from os.urandom at import
_getrandbits = _RNG.getrandbits
_ID_TOP = 1 << 96
# Enum members bound once: `CallOutcome.VALID` is a ~90 ns class attribute lookup (3.11).
_VALID, _REPAIRED = CallOutcome.VALID, CallOutcome.REPAIRED


def escape(text: str) -> str:
    """`text` as the inside of a JSON string (json.dumps without the quotes)."""
    return text if NEEDS_ESCAPE(text) is None else encode_basestring(text)[1:-1]


def default_id() -> str:
    """`call_` + 24 random alphanumerics (hex digits: 96 random bits). Call ids only need
    to be unique within a conversation, not secret; one getrandbits of a seeded Mersenne
    Twister costs ~0.3 us, where choices() of 24 letters took ~2 us and an urandom
    syscall per id ~20 us on a busy VM."""
    # hex() of the bits above a leading 1: the 24 digits of `:024x`, ~0.34 us instead of ~0.45.
    return "call_" + hex(_getrandbits(96) | _ID_TOP)[3:]


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps(value, ensure_ascii=False) builds a new encoder per call (~2 us), and even a
# reused JSONEncoder.encode builds its C encoder per call; this C encoder is built once
# (~0.8 us per list or object instead of ~2.2). No circular-reference check: values come
# from JSON text. Same separators, float repr and escaping as json.dumps.
_c_encoder = (
    c_make_encoder(None, _not_json, encode_basestring, None, ": ", ", ", False, False, True)
    if c_make_encoder is not None
    else None
)
_encode = json.JSONEncoder(ensure_ascii=False).encode


def dumps(value: Any) -> str:
    """json.dumps(value, ensure_ascii=False), with the scalars written directly."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value)  # finite: loads_strict refuses NaN and overflow
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if _c_encoder is not None:
        return "".join(_c_encoder(value, 0))
    return _encode(value)


class ParamPlan:
    """What a parameter opener (its name and `string` attribute) and the tool's schema
    decide: types, value mode, wrapper candidacy, the member's head in the arguments JSON.
    Worked out once per opener text and schema, shared by parsers through the schema's
    derived data (`Call.plans`): an agent's calls repeat a few openers, and working these
    out at every opener took about half of the ~3.5 us an opener cost."""

    __slots__ = ("first", "key", "maybe_wrapper", "missing_attr", "mode", "more", "types")

    def __init__(self, key: str, attr: str | None, tool: ToolSchema | None) -> None:
        self.key = key
        self.types = types = tool.param_types(key) if tool is not None else None
        self.mode = param_mode(attr, types)
        self.missing_attr = attr is None  # a MISSING_STRING_ATTR repair
        # A lone `arguments`/`input` the schema does not declare may wrap the arguments.
        self.maybe_wrapper = (
            key in WRAPPERS and tool is not None and key not in tool.properties
            and bool(tool.properties)
        )  # fmt: skip
        # The member's head in the arguments JSON: first member, or a later one.
        quoted = encode_basestring(key)
        self.first = "{" + quoted + ": "
        self.more = ", " + quoted + ": "


# Plans of tools the request did not declare (no types), by opener text.
_UNTYPED_PLANS: dict[str, ParamPlan] = {}
_MAX_PLANS = 256  # per schema: opener texts are model output


class Call:
    """One invoke being read. Slotted, with every field set here: a class-level default
    read through an instance is not specialized by CPython 3.11, and the handlers read
    these at every tag (~1% of the parser's time on the tool-call corpus)."""

    __slots__ = (
        "args", "body", "broken", "emitted", "error", "errors", "id", "index", "jparts", "name", "opener",
        "outcome", "pending", "plan", "plans", "repairs", "skip", "streaming", "streams",
        "tool", "vparts", "wrapper",
    )  # fmt: skip

    def __init__(self, name: str, tool: ToolSchema | None, streaming: bool) -> None:
        self.name = name
        self.tool = tool
        self.streaming = streaming
        self.id = ""
        self.index = -1  # set when the call starts (at its first parameter, or its end)
        self.opener = ""  # the invoke opener's text (reported if the invoke is no call)
        self.broken = ""  # raw text of an invoke that is no call (a prose body)
        self.skip = False  # the value being read repeats a key: dropped (the first one wins)
        self.args: dict[str, Any] = {}
        self.jparts: list[str] = []  # argument JSON fragments (emitted or, if held, to emit)
        self.emitted = 0  # parameters written into jparts
        self.repairs: list[RepairKind] = []
        self.errors: list[str] = []  # invalid_json messages
        self.body: list[str] | None = None  # raw text of a JSON body
        self.pending: tuple[ParamPlan, Any] | None = None  # a wrapper candidate, not yet written
        # Parameter plans by opener text, shared by equal schemas (see ParamPlan).
        self.plans = _UNTYPED_PLANS if tool is None else tool.plans
        # The parameter being read: its plan, whether it is a wrapper candidate (False
        # outside a value), whether its value streams (a string, the call streaming, no
        # wrapper), and its text as it arrived (empty outside a value).
        self.plan: ParamPlan | None = None
        self.wrapper = False
        self.streams = False
        self.vparts: list[str] = []
        self.outcome = _VALID  # decided at the invoke closer
        self.error: str | None = None

    def new_plan(self, raw: str, key: str, attr: str | None) -> ParamPlan:
        """The plan of parameter opener `raw` (named `key`) for this call's tool, when
        `self.plans` does not have it yet."""
        plan = ParamPlan(key, attr, self.tool)
        if len(self.plans) >= _MAX_PLANS:
            self.plans.clear()
        self.plans[raw] = plan
        return plan

    def write_param(self, plan: ParamPlan, value: Any) -> str:
        """Add a finished parameter; returns its JSON fragment (already in jparts)."""
        self.args[plan.key] = value
        frag = (plan.first if self.emitted == 0 else plan.more) + dumps(value)
        self.emitted += 1
        self.jparts.append(frag)
        return frag

    def write_object(self, obj: dict[str, Any]) -> str | None:
        """Take a whole arguments object (a JSON body, a wrapper, a repair); returns its
        fragment without the closing brace, which comes with the call's end."""
        self.args = dict(obj)
        if not obj:
            return None
        frag = dumps(obj)[:-1]
        self.emitted = len(obj)
        self.jparts.append(frag)
        return frag


def param_mode(attr: str | None, types: frozenset[str] | None) -> int:
    """The value mode of a parameter from its `string` attribute and schema types."""
    if attr is None or attr == "true" or attr.strip().lower() == "true":
        return M_STR if types is None or "string" in types else M_COERCE
    return M_JSON


def close_value(plan: ParamPlan, text: str) -> tuple[Any, bool, str | None]:
    """A held value (M_COERCE or M_JSON) at its closer: (value, coerced, invalid_json error).

    `string="false"` text that is not JSON stays a string when the schema allows strings
    (a coercion); otherwise it is an error naming the parameter."""
    mode, types = plan.mode, plan.types
    if mode == M_COERCE:
        value, changed = coerce_value(text, types)
        return value, changed, None
    if mode == M_JSON:
        try:
            value = loads_strict(text)
        except ValueError as exc:
            if types is not None and "string" in types:
                return text, True, None
            return text, False, f'parameter {plan.key!r}: string="false" value is not JSON ({exc})'
        if isinstance(value, str) and not type_allows(types, value):
            return (*coerce_value(value, types), None)  # a JSON string holding an array
        return value, False, None
    return text, False, None


def convert(call: Call, key: str, attr: str | None, text: str) -> Any:
    """A value recovered by `dsml.repair` (no streaming, no notices)."""
    types = call.tool.param_types(key) if call.tool is not None else None
    if attr is not None and attr.strip().lower() == "false":
        try:
            return loads_strict(text)
        except ValueError:
            return text
    return coerce_value(text, types)[0]


def unwrap(call: Call) -> dict[str, Any] | None:
    """The object inside a lone `arguments`/`input` parameter, when its keys are the
    schema's (dsml.md section 6); None when the parameter is not a wrapper after all."""
    assert call.pending is not None
    inner = call.pending[1]
    if isinstance(inner, str):
        try:
            inner = loads_strict(inner)
        except ValueError:
            return None
    tool = call.tool
    if isinstance(inner, dict) and tool is not None and inner and set(inner) <= set(tool.properties):
        return inner
    return None


def validate_call(call: Call, tools: ToolRegistry) -> tuple[CallOutcome, str | None]:
    """Validate a closed call against its tool's schema."""
    if call.tool is None:
        names = ", ".join(tools.names()) or "none"
        return CallOutcome.UNKNOWN_TOOL, f"unknown tool {call.name!r}; declared: {names}"
    if call.errors:
        return CallOutcome.INVALID_JSON, "; ".join(call.errors)
    error = call.tool.validate(call.args)
    if error is not None:
        return CallOutcome.SCHEMA_INVALID, error
    return (_REPAIRED if call.repairs else _VALID), None


__all__ = [
    "M_COERCE", "M_JSON", "M_STR", "Call", "ParamPlan", "close_value", "convert", "default_id", "dumps",
    "escape", "param_mode", "unwrap", "validate_call",
]  # fmt: skip
