"""Tool schemas of one request: parameter types, value coercion, validation.

Built from the request's OpenAI tool definitions. Validation is JSON Schema Draft 2020-12
(`jsonschema.Draft202012Validator`) with a `referencing` registry that refuses every
retrieval: a tool schema may use local `$ref`s (`#/$defs/...`) but never makes the proxy
fetch a URL. Compiled validators are cached by schema text, so a request that repeats an
agent's usual tools costs a dict lookup.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from dsml.checks import compile_check, json_type, type_allows
from dsml.patterns import PatternError, validator_class

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator


_JSON_TYPES = ("string", "boolean", "integer", "number", "array", "object", "null")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 parses to inf, which json.dumps would write as Infinity
        raise ValueError(f"{text} overflows a float")
    return value


# One decoder for every call: json.loads with options builds a new one each time (~2 us).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_DECODE = _DECODER.decode
_SCAN = _DECODER.scan_once  # the C scanner, with the hooks above
_WS = " \t\n\r"


def loads_strict(text: str) -> Any:
    """json.loads without NaN/Infinity (they would make the streamed arguments invalid JSON)."""
    # Most values are one JSON value without surrounding whitespace: the C scanner alone
    # reads them (decode() adds two regex matches, ~1 us). Anything else, errors included,
    # goes through decode() so the result and the error message are json's own.
    if text and text[0] not in _WS and text[-1] not in _WS:
        try:
            value, end = _SCAN(text, 0)
        except (StopIteration, ValueError):
            pass
        else:
            if end == len(text):
                return value
    return _DECODE(text)


def _refuse(uri: str) -> Any:
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


@lru_cache(maxsize=512)
def _compile(schema_text: str) -> Draft202012Validator | None:
    # Imported here: most tool schemas never need jsonschema (see dsml.checks).
    from jsonschema.exceptions import SchemaError
    from referencing import Registry

    schema = json.loads(schema_text)
    cls = validator_class()  # Draft 2020-12, patterns on RE2 (dsml.patterns)
    try:
        cls.check_schema(schema)
    except (SchemaError, RecursionError):
        return None  # the renderer already accepted it; a broken schema cannot judge calls
    return cls(schema, registry=Registry(retrieve=_refuse))  # type: ignore[no-any-return]


class _Derived:
    """What is derived from one tool schema's content: its check, parameter types and
    parameter plans. Shared by equal schemas (see _derived)."""

    __slots__ = ("check", "plans", "types")

    def __init__(self) -> None:
        self.check: Callable[[Any], str | None] | bool | None = False  # False: not built yet
        self.types: dict[str, frozenset[str] | None] = {}
        self.plans: dict[str, Any] = {}  # dsml.calls.ParamPlan by parameter opener text


_DERIVED: dict[bytes, _Derived] = {}
_MAX_DERIVED = 512


def _derived(schema: dict[str, Any]) -> _Derived:
    """The derived data of `schema`, cached by its pickle. Building a check costs ~10-20
    us (several validations) and a turn rarely calls a tool more than once; an agent sends
    the same tools every turn, so it is built once per process. A pickle (~1.8 us a tool;
    repr took ~4) round-trips exactly, so equal bytes mean equal schemas with equal types
    (1, 1.0 and True differ). marshal is faster but its bytes follow reference counts, so
    the same schema missed the cache."""
    try:
        key = pickle.dumps(schema, protocol=4)
    except Exception:  # not plain data (or too deep): private, uncached
        return _Derived()
    derived = _DERIVED.get(key)
    if derived is None:
        if len(_DERIVED) >= _MAX_DERIVED:
            _DERIVED.clear()
        derived = _DERIVED[key] = _Derived()
    return derived


class ToolSchema:
    """One declared tool: its parameter schema, type lookup and validator."""

    __slots__ = ("_derived", "_validator", "name", "parameters", "properties", "required")

    def __init__(self, name: str, parameters: dict[str, Any] | None) -> None:
        self.name = name
        self.parameters = parameters if isinstance(parameters, dict) else {}
        props = self.parameters.get("properties")
        self.properties: dict[str, Any] = props if isinstance(props, dict) else {}
        req = self.parameters.get("required")
        self.required: list[str] = (
            [r for r in req if isinstance(r, str)] if isinstance(req, list) else []
        )
        self._validator: Draft202012Validator | bool | None = False  # False: not built yet
        self._derived: _Derived | None = None  # looked up when first needed

    def param_types(self, key: str) -> frozenset[str] | None:
        """JSON types the schema allows for parameter `key`; None when anything goes."""
        derived = self._derived or self._derive()
        types = derived.types
        if key not in types:
            sub = self.properties.get(key)
            if sub is None:
                return None  # not cached: undeclared names are model output, unbounded
            types[key] = _types_of(sub, self.parameters, 0)
        return types[key]

    @property
    def plans(self) -> dict[str, Any]:
        """`dsml.calls`' cache of parameter plans (by opener text), shared by equal schemas."""
        return (self._derived or self._derive()).plans

    def _derive(self) -> _Derived:
        self._derived = derived = _derived(self.parameters)
        return derived

    def validate(self, arguments: dict[str, Any]) -> str | None:
        """The first validation error message, or None when `arguments` is valid."""
        derived = self._derived or self._derive()
        check = derived.check
        if check is False:
            # From a private copy: the check's closures keep parts of the schema, and the
            # caller's dict may change after this request.
            try:
                check = compile_check(copy.deepcopy(self.parameters))
            except RecursionError:  # too deep to copy: jsonschema (bounded above) decides
                check = None
            derived.check = check
        if check is not None:
            return check(arguments)  # type: ignore[operator]
        if self._validator is False:
            try:
                text = json.dumps(self.parameters, sort_keys=True)
            except (TypeError, ValueError, RecursionError):
                text = "{}"
            self._validator = _compile(text)
        if self._validator is None:
            return None
        from referencing.exceptions import Unresolvable

        try:
            errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        except Unresolvable as exc:  # a remote (refused) or missing $ref
            return f"schema reference cannot be resolved: {exc}"
        except RecursionError:  # a $ref cycle (`#/$defs/a` -> itself), or a schema too deep
            return "the schema cannot be applied: its references loop or nest too deeply"
        except PatternError as exc:  # a library caller skipped dsml.request's check
            return f"the schema has a pattern RE2 cannot take: {exc}"
        if not errors:
            return None
        err = errors[0]
        where = "/".join(str(p) for p in err.path)
        return f"{where}: {err.message}" if where else err.message


_ONE_TYPE = {t: frozenset([t]) for t in _JSON_TYPES}


def _types_of(sub: Any, root: dict[str, Any], depth: int) -> frozenset[str] | None:
    """Types a subschema accepts: `type`, `enum`/`const`, unions and local `$ref`s."""
    if not isinstance(sub, dict) or depth > 8:
        return None
    t = sub.get("type")
    if type(t) is str and "$ref" not in sub and t in _ONE_TYPE:
        return _ONE_TYPE[t]  # the usual `{"type": "string", ...}`: no new frozenset
    if isinstance(sub.get("$ref"), str) and sub["$ref"].startswith("#/"):
        node: Any = root
        for part in sub["$ref"][2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        return _types_of(node, root, depth + 1)
    t = sub.get("type")
    if isinstance(t, str):
        return frozenset([t])
    if isinstance(t, list):
        return frozenset(x for x in t if isinstance(x, str))
    if isinstance(sub.get("enum"), list):
        return frozenset(json_type(v) for v in sub["enum"])
    if "const" in sub:
        return frozenset([json_type(sub["const"])])
    for union in ("anyOf", "oneOf"):
        branches = sub.get(union)
        if isinstance(branches, list):
            out: set[str] = set()
            for branch in branches:
                bt = _types_of(branch, root, depth + 1)
                if bt is None:
                    return None
                out |= bt
            return frozenset(out)
    return None


class ToolRegistry:
    """The tools of one request, by name. A ToolSchema is built when a call first names
    its tool: a request often offers many tools and calls one or two."""

    __slots__ = ("_built", "_defs")

    def __init__(self, tools: list[dict[str, Any]] | None) -> None:
        self._defs: dict[str, Any] = {}  # name -> parameters
        self._built: dict[str, ToolSchema] = {}
        for tool in tools or []:
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                self._defs[fn["name"]] = fn.get("parameters")

    @property
    def tools(self) -> dict[str, ToolSchema]:
        return {name: self.get(name) for name in self._defs}  # type: ignore[misc]

    def __bool__(self) -> bool:
        return bool(self._defs)

    def names(self) -> list[str]:
        return sorted(self._defs)

    def get(self, name: str) -> ToolSchema | None:
        schema = self._built.get(name)
        if schema is None and name in self._defs:
            schema = self._built[name] = ToolSchema(name, self._defs[name])
        return schema


def coerce_value(value: Any, types: frozenset[str] | None) -> tuple[Any, bool]:
    """Coerce a string that the schema types otherwise (numbers, booleans, arrays, objects,
    or a JSON string where an array is expected). Returns (value, changed)."""
    if not isinstance(value, str) or types is None or "string" in types:
        return value, False
    try:
        parsed = loads_strict(value)
    except ValueError:
        return value, False
    if type_allows(types, parsed):
        return parsed, True
    return value, False


__all__ = ["ToolRegistry", "ToolSchema", "coerce_value", "json_type", "loads_strict", "type_allows"]
