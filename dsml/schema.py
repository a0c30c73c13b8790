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
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

# JSON types as Python sees them after json.loads; bool is checked before int (bool < int).
# Also the types that satisfy a JSON type outright (a float needs a look at its value to be
# an integer).
_PY_TYPES = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def type_allows(types: frozenset[str] | None, value: Any) -> bool:
    if types is None:
        return True
    kind = json_type(value)
    if kind == "integer" and "number" in types:
        return True
    if kind == "number" and "integer" in types and float(value).is_integer():
        return True
    return kind in types


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
    # Imported here: most tool schemas never need jsonschema (see _fast_check).
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from referencing import Registry

    schema = json.loads(schema_text)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        return None  # the renderer already accepted it; a broken schema cannot judge calls
    return Draft202012Validator(schema, registry=Registry(retrieve=_refuse))  # type: ignore[call-arg]


# Keywords that never fail validation (annotations; `format` asserts nothing without a
# format checker, which Draft202012Validator does not use by default).
_ANNOTATIONS = frozenset(
    ("description", "title", "default", "examples", "format", "$comment", "deprecated",
     "readOnly", "writeOnly", "$schema")
)  # fmt: skip
Check = Any  # Callable[[Any], bool]


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema means it (True != 1, 1 == 1.0)."""
    ta, tb = json_type(a), json_type(b)
    if ta != tb and not ({ta, tb} <= {"integer", "number"}):
        return False
    if ta == "array":
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ta == "object":
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _fast_check(schema: Any, depth: int = 0) -> Check | None:
    """A plain-Python validator for the common subset of JSON Schema (type, properties,
    required, enum, const, items, additionalProperties, numeric and length bounds), or None
    when the schema uses anything else (then jsonschema does the work). The check returns
    the first error message or None. Why: jsonschema spends 10-1000 us per call here (it
    evolves a resolver per subschema); this spends ~1 us, and tests hold the two to the same
    verdicts on every vector."""
    if schema is True or (isinstance(schema, dict) and not schema):
        return lambda v: None
    if schema is False:
        return lambda v: "False schema does not allow " + repr(v)
    if not isinstance(schema, dict) or depth > 16:
        return None
    checks: list[Check] = []
    for key, arg in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "type":
            types = frozenset(
                [arg] if isinstance(arg, str) else arg if isinstance(arg, list) else ()
            )
            if not types or not types <= set(_PY_TYPES):
                return None
            # `type(v) in exact` decides the usual case with one lookup; _type_ok the rest.
            exact = tuple(t for name in types for t in _PY_TYPES[name])
            checks.append(
                lambda v, x=exact, t=types, a=arg: None
                if type(v) in x or _type_ok(v, t)
                else f"{v!r} is not of type {a!r}"
            )
        elif key == "properties" and isinstance(arg, dict):
            subs = {}
            for name, sub in arg.items():
                c = _fast_check(sub, depth + 1)
                if c is None:
                    return None
                subs[name] = c
            checks.append(_properties(subs))
        elif key == "required" and isinstance(arg, list):
            checks.append(lambda v, r=tuple(arg): _required(v, r))
        elif key == "additionalProperties":
            extra = _fast_check(arg, depth + 1)
            if extra is None or schema.get("patternProperties"):
                return None
            known = tuple(schema.get("properties") or ())
            checks.append(lambda v, e=extra, k=known: _each(v, None, e, k))
        elif key == "items":
            item = _fast_check(arg, depth + 1)
            if item is None:
                return None
            checks.append(lambda v, c=item: _items(v, c))
        elif key == "enum" and isinstance(arg, list):
            # Most enums list strings: a set lookup decides a string member at once.
            strs = frozenset(x for x in arg if type(x) is str)
            checks.append(lambda v, e=tuple(arg), s=strs: None
                          if (type(v) is str and v in s) or any(_json_equal(v, x) for x in e)
                          else f"{v!r} is not one of {list(e)!r}")  # fmt: skip
        elif key == "const":
            checks.append(lambda v, c=arg: None if _json_equal(v, c) else f"{c!r} was expected")
        elif key in _BOUNDS and isinstance(arg, int | float) and not isinstance(arg, bool):
            checks.append(_BOUNDS[key](arg))
        else:
            return None
    if len(checks) == 1:
        return checks[0]
    return _all_of(tuple(checks))


def _all_of(checks: tuple[Check, ...]) -> Check:
    """The first error of `checks`, in the schema's keyword order."""
    if len(checks) == 2:  # unrolled: most subschemas have 2 or 3 keywords (type + one or two)
        a, b = checks

        def check2(v: Any) -> str | None:
            err = a(v)
            return err if err is not None else b(v)

        return check2
    if len(checks) == 3:
        a, b, c = checks

        def check3(v: Any) -> str | None:
            err = a(v)
            if err is not None:
                return err
            err = b(v)
            return err if err is not None else c(v)

        return check3

    def check(v: Any) -> str | None:
        for c in checks:
            err = c(v)
            if err is not None:
                return err
        return None

    return check


def _properties(subs: dict[str, Check]) -> Check:
    """`properties`: each present key against its subschema (as `_each` with subs)."""

    def check(v: Any) -> str | None:
        if isinstance(v, dict):
            for k, x in v.items():
                c = subs.get(k)
                if c is not None:
                    err = c(x)
                    if err is not None:
                        return f"{k}: {err}"
        return None

    return check


class _Derived:
    """What is derived from one tool schema's content: its check and parameter types.
    Shared by equal schemas (see _derived)."""

    __slots__ = ("check", "types")

    def __init__(self) -> None:
        self.check: Check | bool | None = False  # False: not built yet
        self.types: dict[str, frozenset[str] | None] = {}


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


def _each(
    v: Any, subs: dict[str, Check] | None, extra: Check | None, known: tuple[str, ...]
) -> str | None:
    """`properties` (subs) or `additionalProperties` (extra, for keys not in known)."""
    if not isinstance(v, dict):
        return None
    for k, x in v.items():
        c = subs.get(k) if subs is not None else (None if k in known else extra)
        if c is None or (err := c(x)) is None:
            continue
        if subs is None and err.startswith("False schema"):
            return f"Additional properties are not allowed ({k!r} was unexpected)"
        return f"{k}: {err}"
    return None


def _required(v: Any, required: tuple[str, ...]) -> str | None:
    if isinstance(v, dict):
        for k in required:
            if k not in v:
                return f"{k!r} is a required property"
    return None


def _items(v: Any, check: Check) -> str | None:
    if isinstance(v, list):
        for i, x in enumerate(v):
            if (err := check(x)) is not None:
                return f"{i}: {err}"
    return None


def _type_ok(value: Any, types: frozenset[str]) -> bool:
    kind = json_type(value)
    if kind in types:
        return True
    if kind == "integer":
        return "number" in types
    return kind == "number" and "integer" in types and float(value).is_integer()



def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_BOUNDS = {
    "minimum": lambda n: (
        lambda v: None if not _num(v) or v >= n else f"{v!r} is less than the minimum of {n!r}"
    ),
    "maximum": lambda n: (
        lambda v: None if not _num(v) or v <= n else f"{v!r} is greater than the maximum of {n!r}"
    ),
    "exclusiveMinimum": lambda n: (
        lambda v: None if not _num(v) or v > n else f"{v!r} is less than or equal to {n!r}"
    ),
    "exclusiveMaximum": lambda n: (
        lambda v: None if not _num(v) or v < n else f"{v!r} is greater than or equal to {n!r}"
    ),
    "minLength": lambda n: (
        lambda v: None if not isinstance(v, str) or len(v) >= n else f"{v!r} is too short"
    ),
    "maxLength": lambda n: (
        lambda v: None if not isinstance(v, str) or len(v) <= n else f"{v!r} is too long"
    ),
    "minItems": lambda n: (
        lambda v: None if not isinstance(v, list) or len(v) >= n else f"{v!r} is too short"
    ),
    "maxItems": lambda n: (
        lambda v: None if not isinstance(v, list) or len(v) <= n else f"{v!r} is too long"
    ),
}


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
            types[key] = None if sub is None else _types_of(sub, self.parameters, 0)
        return types[key]

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
            check = derived.check = _fast_check(copy.deepcopy(self.parameters))
        if check is not None:
            return check(arguments)  # type: ignore[operator]
        if self._validator is False:
            try:
                text = json.dumps(self.parameters, sort_keys=True)
            except (TypeError, ValueError):
                text = "{}"
            self._validator = _compile(text)
        if self._validator is None:
            return None
        from referencing.exceptions import Unresolvable

        try:
            errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        except Unresolvable as exc:  # a remote (refused) or missing $ref
            return f"schema reference cannot be resolved: {exc}"
        if not errors:
            return None
        err = errors[0]
        where = "/".join(str(p) for p in err.path)
        return f"{where}: {err.message}" if where else err.message


_ONE_TYPE = {t: frozenset([t]) for t in _PY_TYPES}


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
