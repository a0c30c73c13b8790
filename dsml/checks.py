"""Tool-schema checks compiled to Python: the common subset of JSON Schema, one function.

`compile_check(schema)` returns `check(value) -> str | None` (the first error message, or
None when the value is valid), or None when the schema uses a keyword outside the subset:
type, properties, required, additionalProperties, items, enum, const, pattern (matched by
RE2, dsml.patterns: linear time) and the numeric and length bounds (annotations are
ignored). Then `jsonschema` does the work.

Why generated source: every parser validates each tool call it closes, and a check built
from one closure per keyword spent ~5 us on a typical call (a Python call per keyword per
value). The generated function inlines every keyword, so a call costs one function call
and a few comparisons. Tests hold its verdicts to jsonschema's on the vectors and on
random schemas.

Generated code never contains schema text: every constant (property names, enum members,
bounds, the `type` argument for messages) is passed in by name, so a schema cannot inject
code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsml.patterns import PatternError, compile_pattern

Check = Callable[[Any], "str | None"]

# JSON types as Python sees them after json.loads (bool is not an int here: type() is exact).
_PY_TYPES = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
# Keywords that never fail validation (`format` asserts nothing without a format checker,
# which Draft202012Validator does not use by default).
ANNOTATIONS = frozenset(
    ("description", "title", "default", "examples", "format", "$comment", "deprecated",
     "readOnly", "writeOnly", "$schema")
)  # fmt: skip
_MAX_DEPTH = 16


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


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON Schema means it (True != 1, 1 == 1.0)."""
    ta, tb = json_type(a), json_type(b)
    if ta != tb and not ({ta, tb} <= {"integer", "number"}):
        return False
    if ta == "array":
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ta == "object":
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def type_allows(types: frozenset[str] | None, value: Any) -> bool:
    """`value` is of one of the JSON `types` (None: any), as JSON Schema counts: an
    integer is a number, an integral float is an integer."""
    if types is None:
        return True
    kind = json_type(value)
    if kind in types:
        return True
    if kind == "integer":
        return "number" in types
    return kind == "number" and "integer" in types and float(value).is_integer()


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Bounds: keyword -> (applies-to test, failing comparison, message after the value's repr).
_BOUNDS = {
    "minimum": ("_num({v})", "{v} < {n}", " is less than the minimum of "),
    "maximum": ("_num({v})", "{v} > {n}", " is greater than the maximum of "),
    "exclusiveMinimum": ("_num({v})", "{v} <= {n}", " is less than or equal to "),
    "exclusiveMaximum": ("_num({v})", "{v} >= {n}", " is greater than or equal to "),
    "minLength": ("type({v}) is str", "len({v}) < {n}", " is too short"),
    "maxLength": ("type({v}) is str", "len({v}) > {n}", " is too long"),
    "minItems": ("type({v}) is list", "len({v}) < {n}", " is too short"),
    "maxItems": ("type({v}) is list", "len({v}) > {n}", " is too long"),
}
_SHOWS_BOUND = frozenset(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))


class _Unsupported(Exception):
    """The schema leaves the subset: jsonschema validates it."""


class _Writer:
    """Emits the body of `check(v)`. A failing keyword returns its message, prefixed by
    the path that led to it (`city: `, `0: `), built from names, never from schema text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self._names = 0

    def const(self, value: Any) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        return name

    def var(self, stem: str) -> str:
        self._names += 1
        return f"{stem}{self._names}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def schema(self, schema: Any, v: str, prefix: str, indent: int, depth: int) -> None:
        """Lines that return the first error of value `v` against `schema`."""
        if schema is True or (isinstance(schema, dict) and not schema):
            return
        if schema is False:
            self.emit(indent, f'return {prefix}"False schema does not allow " + repr({v})')
            return
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            raise _Unsupported
        for key, arg in schema.items():
            if key in ANNOTATIONS:
                continue
            if key == "type":
                self._type(arg, v, prefix, indent)
            elif key == "properties" and isinstance(arg, dict):
                self._properties(arg, v, prefix, indent, depth)
            elif key == "required" and isinstance(arg, list):
                if not all(type(name) is str for name in arg):
                    raise _Unsupported
                names = self.const(tuple(arg))
                k = self.var("k")
                self.emit(indent, f"if type({v}) is dict:")
                self.emit(indent + 1, f"for {k} in {names}:")
                self.emit(indent + 2, f"if {k} not in {v}:")
                self.emit(indent + 3, f'return {prefix}repr({k}) + " is a required property"')
            elif key == "additionalProperties":
                if schema.get("patternProperties") or not isinstance(
                    schema.get("properties", {}), dict
                ):
                    raise _Unsupported
                self._additional(schema, arg, v, prefix, indent, depth)
            elif key == "items":
                i, x = self.var("i"), self.var("x")
                self.emit(indent, f"if type({v}) is list:")
                self.emit(indent + 1, f"for {i}, {x} in enumerate({v}):")
                before = len(self.lines)
                self.schema(arg, x, f'{prefix}str({i}) + ": " + ', indent + 2, depth + 1)
                if len(self.lines) == before:
                    self.emit(indent + 2, "pass")
            elif key == "enum" and isinstance(arg, list):
                # Most enums list strings: a set lookup decides a string member at once.
                strs = self.const(frozenset(x for x in arg if type(x) is str))
                members = self.const(tuple(arg))
                shown = self.const(repr(list(arg)))
                self.emit(indent, f"if not (type({v}) is str and {v} in {strs}) and not any("
                                  f"_json_equal({v}, m) for m in {members}):")  # fmt: skip
                self.emit(indent + 1, f'return {prefix}repr({v}) + " is not one of " + {shown}')
            elif key == "const":
                c = self.const(arg)
                shown = self.const(repr(arg))
                self.emit(indent, f"if not _json_equal({v}, {c}):")
                self.emit(indent + 1, f'return {prefix}{shown} + " was expected"')
            elif key == "pattern" and isinstance(arg, str):
                try:
                    program = self.const(compile_pattern(arg))
                except PatternError:
                    raise _Unsupported from None
                shown = self.const(repr(arg))
                self.emit(indent, f"if type({v}) is str and not _matches({program}, {v}):")
                self.emit(indent + 1, f'return {prefix}repr({v}) + " does not match " + {shown}')
            elif key in _BOUNDS and isinstance(arg, int | float) and not isinstance(arg, bool):
                applies, fails, message = _BOUNDS[key]
                n = self.const(arg)
                tail = f' + "{message}" + repr({n})' if key in _SHOWS_BOUND else f' + "{message}"'
                self.emit(indent, f"if {applies.format(v=v)} and {fails.format(v=v, n=n)}:")
                self.emit(indent + 1, f"return {prefix}repr({v}){tail}")
            else:
                raise _Unsupported

    def _type(self, arg: Any, v: str, prefix: str, indent: int) -> None:
        names = [arg] if isinstance(arg, str) else arg if isinstance(arg, list) else []
        # a malformed `type` (a list holding a schema, a number) is left to jsonschema
        if not names or not all(isinstance(n, str) for n in names):
            raise _Unsupported
        types = frozenset(names)
        if not types <= _PY_TYPES.keys():
            raise _Unsupported
        exact = tuple(t for name in types for t in _PY_TYPES[name])
        # `type(v) is str` decides the usual case; type_allows the rest (2.0 is an integer).
        test = (  # every type name is a global of the generated code (NoneType included)
            f"type({v}) is not {exact[0].__name__}"
            if len(exact) == 1
            else f"type({v}) not in {self.const(exact)}"
        )
        names = self.const(types)
        shown = self.const(repr(arg))
        self.emit(indent, f"if {test} and not _type_allows({names}, {v}):")
        self.emit(indent + 1, f'return {prefix}repr({v}) + " is not of type " + {shown}')

    def _properties(self, props: dict[str, Any], v: str, prefix: str, indent: int,
                    depth: int) -> None:  # fmt: skip
        """Each present key against its subschema, in the schema's order."""
        body: list[str] = []
        saved, self.lines = self.lines, body
        for name, sub in props.items():
            x = self.var("x")
            key = self.const(name)
            mark = len(self.lines)
            self.emit(indent + 1, f"{x} = {v}.get({key}, _MISSING)")
            self.emit(indent + 1, f"if {x} is not _MISSING:")
            before = len(self.lines)
            self.schema(sub, x, f'{prefix}{key} + ": " + ', indent + 2, depth + 1)
            if len(self.lines) == before:  # nothing to check: drop the lookup
                del self.lines[mark:]
        self.lines = saved
        if body:
            self.emit(indent, f"if type({v}) is dict:")
            self.lines.extend(body)

    def _additional(self, schema: dict[str, Any], extra: Any, v: str, prefix: str,
                    indent: int, depth: int) -> None:  # fmt: skip
        """`additionalProperties`: every key not in `properties` against `extra`."""
        known = self.const(frozenset(schema.get("properties") or ()))
        k, x = self.var("k"), self.var("x")
        if extra is False:
            self.emit(indent, f"if type({v}) is dict:")
            self.emit(indent + 1, f"for {k} in {v}:")
            self.emit(indent + 2, f"if {k} not in {known}:")
            self.emit(indent + 3, f'return {prefix}"Additional properties are not allowed (" + '
                                  f'repr({k}) + " was unexpected)"')  # fmt: skip
            return
        body: list[str] = []
        saved, self.lines = self.lines, body
        self.schema(extra, x, f'{prefix}str({k}) + ": " + ', indent + 3, depth + 1)
        self.lines = saved
        if body:
            self.emit(indent, f"if type({v}) is dict:")
            self.emit(indent + 1, f"for {k}, {x} in {v}.items():")
            self.emit(indent + 2, f"if {k} not in {known}:")
            self.lines.extend(body)


def _matches(program: Any, text: str) -> bool:
    try:
        return program.search(text) is not None
    except UnicodeEncodeError:  # a lone surrogate: RE2 reads UTF-8
        return program.search(text.encode("utf-8", "replace").decode("utf-8")) is not None


_MISSING = object()
_GLOBALS = {"_matches": _matches, "_type_allows": type_allows, "_json_equal": json_equal, "_num": _num, "_MISSING": _MISSING,
            "NoneType": type(None)}  # fmt: skip


def compile_check(schema: Any) -> Check | None:
    """A check for `schema`, or None when it leaves the subset (see the module docstring)."""
    writer = _Writer()
    try:
        writer.schema(schema, "v", "", 1, 0)
    except _Unsupported:
        return None
    if not writer.lines:
        return _valid
    source = "def check(v):\n" + "\n".join(writer.lines) + "\n    return None\n"
    namespace = {**_GLOBALS, **writer.consts}
    try:
        code = compile(source, "<dsml schema check>", "exec")
    except (SyntaxError, RecursionError, MemoryError):  # too deeply nested for the compiler
        return None
    exec(code, namespace)  # no schema text in the source: constants are names
    check = namespace["check"]
    check.source = source  # type: ignore[attr-defined]  # for debugging and tests
    return check


def _valid(v: Any) -> None:
    return None


__all__ = ["ANNOTATIONS", "Check", "compile_check", "json_equal", "json_type", "type_allows"]
