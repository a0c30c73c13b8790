"""Client-supplied regular expressions (JSON Schema `pattern`, `patternProperties`), in RE2.

A tool schema comes from the client, and Python's `re` backtracks: `^(a+)+$` against 28
`a`s and a `!` took 7.9 s of the event loop, doubling with every character. RE2 (the
`google-re2` binding) matches in time linear in the text, whatever the pattern, and refuses
what it cannot do that way (backreferences, lookaround): such a pattern is refused when the
request comes (`schema_pattern_error`, a 400 naming the tool and the keyword), never tried
on model output.

`jsonschema` runs `re.search` itself for `pattern`, `patternProperties` and
`additionalProperties` (next to `patternProperties`); `validator_class()` is Draft 2020-12
with those three keywords on RE2. `unevaluatedProperties` also matches `patternProperties`
inside jsonschema, so a schema that has both is refused at request time (no tool schema in
the wild needs the pair).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, lru_cache
from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 writes every refused pattern to stderr otherwise


class PatternError(ValueError):
    """RE2 cannot take this pattern."""


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """The RE2 program of `pattern` (cached: a schema's patterns run on every call)."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        message = exc.args[0] if exc.args else exc
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        raise PatternError(str(message)) from None
    except (UnicodeEncodeError, TypeError) as exc:  # a lone surrogate, not a string
        raise PatternError(str(exc)) from None


def search(pattern: str, text: str) -> bool:
    """`re.search(pattern, text)` is not None, in linear time (PatternError: see above)."""
    program = compile_pattern(pattern)
    try:
        return program.search(text) is not None
    except UnicodeEncodeError:  # a lone surrogate in the text: RE2 reads UTF-8
        return program.search(text.encode("utf-8", "replace").decode("utf-8")) is not None


# Where a schema holds subschemas: one, a list of them, a map of them (JSON Schema 2020-12
# and the older `definitions`/`dependencies`/`additionalItems`).
_ONE = ("items", "additionalItems", "additionalProperties", "unevaluatedItems",
        "unevaluatedProperties", "contains", "propertyNames", "not", "if", "then", "else")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
         "dependencies")
_MAX_DEPTH = 256  # deeper schemas are refused elsewhere (dsml.request); this only stops a walk


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield schema[key], f"{path}.{key}"
    for key in _LISTS:
        if isinstance(schema.get(key), list):
            for k, sub in enumerate(schema[key]):
                yield sub, f"{path}.{key}[{k}]"
    for key in _MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield sub, f"{path}.{key}.{name}"


def schema_pattern_error(schema: Any, path: str = "parameters"
                         ) -> tuple[str, str, str] | None:
    """The first (path, keyword, problem) of a pattern in `schema` that RE2 cannot take, or None.

    Walks every subschema (iteratively: a schema may be deep), so property names that
    happen to be called "pattern" are not mistaken for the keyword."""
    has_unevaluated = has_pattern_properties = False
    stack: list[tuple[Any, str, int]] = [(schema, path, 0)]
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict) or depth > _MAX_DEPTH:
            continue
        pattern = node.get("pattern")
        if "pattern" in node:
            if not isinstance(pattern, str):
                return f"{where}.pattern", "pattern", "must be a string"
            try:
                compile_pattern(pattern)
            except PatternError as exc:
                return f"{where}.pattern", "pattern", str(exc)
        props = node.get("patternProperties")
        if isinstance(props, dict):
            has_pattern_properties = has_pattern_properties or bool(props)
            for key in props:
                try:
                    compile_pattern(key)
                except PatternError as exc:
                    return f"{where}.patternProperties", "patternProperties", f"{key!r}: {exc}"
        if "unevaluatedProperties" in node:
            has_unevaluated = True
        if has_unevaluated and has_pattern_properties:
            return (where, "unevaluatedProperties", "unevaluatedProperties together with patternProperties is not "
                    "supported (its patterns would run on a backtracking engine)")
        stack.extend((sub, p, depth + 1) for sub, p in _subschemas(node, where))
    return None


# -- jsonschema on RE2 ------------------------------------------------------------------------


def _pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not search(patrn, instance):
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                        schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for k, v in instance.items():
            if search(pattern, k):
                yield from validator.descend(v, subschema, path=k, schema_path=pattern)


def _additional_properties(validator: Any, aP: Any, instance: Any, schema: Any
                           ) -> Iterator[Any]:
    from jsonschema import _keywords
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object") or not schema.get("patternProperties"):
        yield from _keywords.additionalProperties(validator, aP, instance, schema)
        return
    # jsonschema's own version joins the patterns with "|" for `re.search`: the same
    # keys (in no `properties`, matched by no pattern) and messages, found with RE2.
    properties = schema.get("properties", {})
    patterns = list(schema["patternProperties"])
    extras = [k for k in instance
              if k not in properties and not any(search(p, k) for p in patterns)]
    if validator.is_type(aP, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], aP, path=extra)
    elif not aP and extras:
        verb = "does" if len(extras) == 1 else "do"
        joined = ", ".join(repr(each) for each in sorted(extras))
        shown = ", ".join(repr(each) for each in sorted(patterns))
        yield ValidationError(f"{joined} {verb} not match any of the regexes: {shown}")


@cache
def validator_class() -> Any:
    """Draft202012Validator with `pattern`, `patternProperties`, `additionalProperties`
    matched by RE2."""
    from jsonschema import Draft202012Validator, validators

    return validators.extend(Draft202012Validator, {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    })


__all__ = ["PatternError", "compile_pattern", "schema_pattern_error", "search",
           "validator_class"]
