"""Just enough of a PromQL reader to list the series an expression selects.

Dashboards and alert rules must use metric names the server really exports; this finds
every vector selector in an expression (metric name + label matchers), the function or
aggregation it sits inside, and the labels of `by (...)` / `without (...)` / `on (...)`
lists. It is not a full parser: `promtool check rules` validates the syntax itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])                       # range or subquery: [5m], [$__rate_interval]
  | (?P<var>\$\{[^}]*\}|\$\w+)                  # Grafana variables outside strings
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<punct>[{}(),])
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@])
    """,
    re.VERBOSE,
)

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str  # = != =~ !~
    value: str


@dataclass
class Selector:
    name: str | None  # None for a bare {__name__=~"..."} without an equality on the name
    matchers: list[Matcher] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)  # enclosing calls, outermost first


@dataclass
class Query:
    selectors: list[Selector]
    grouping_labels: set[str]  # every label named in by/without/on/ignoring/group_* lists


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read PromQL at {pos}: {expr[pos:pos + 30]!r}")
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def _unquote(s: str) -> str:
    if s[0] == "`":
        return s[1:-1]
    return s[1:-1].encode().decode("unicode_escape")


def parse(expr: str) -> Query:
    toks = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    stack: list[str] = []  # one entry per open parenthesis: the call's name or ""
    pending_call = ""  # an aggregation whose parenthesis comes after its by/without list
    i = 0

    def read_matchers(j: int) -> tuple[list[Matcher], int]:
        # toks[j] is "{": read `label op "value"` pairs up to "}".
        matchers, j = [], j + 1
        while toks[j] != ("punct", "}"):
            if toks[j] == ("punct", ","):
                j += 1
                continue
            (k1, label), (k2, op), (k3, value) = toks[j:j + 3]
            if k1 != "ident" or k2 != "op" or k3 != "string":
                raise ValueError(f"bad label matcher in {expr!r}")
            matchers.append(Matcher(label, op, _unquote(value)))
            j += 3
        return matchers, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "ident" and text in LABEL_LISTS:
            i += 1
            if nxt == ("punct", "("):
                i += 1
                while toks[i] != ("punct", ")"):
                    if toks[i][0] == "ident":
                        grouping.add(toks[i][1])
                    i += 1
                i += 1
            continue
        if kind == "ident" and text in KEYWORDS:
            i += 1
            continue
        if kind == "ident" and (nxt == ("punct", "(") or text in AGGREGATIONS):
            pending_call = text  # function call, or aggregation with a leading by/without
            i += 1
            continue
        if kind == "ident" or (kind == "punct" and text == "{"):
            name = text if kind == "ident" else None
            matchers: list[Matcher] = []
            j = i + 1 if kind == "ident" else i
            if j < len(toks) and toks[j] == ("punct", "{"):
                matchers, j = read_matchers(j)
            if name is None:
                names = [m.value for m in matchers if m.label == "__name__" and m.op == "="]
                name = names[0] if names else None
            selectors.append(Selector(name, matchers, [s for s in stack if s]))
            i = j
            continue
        if kind == "punct" and text == "(":
            stack.append(pending_call)
            pending_call = ""
        elif kind == "punct" and text == ")":
            stack.pop()
        i += 1
    if stack:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    return Query(selectors, grouping)


_GRAFANA_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),)?\s*(?P<label>\w+)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[Query, str]:
    """Grafana's `label_values(selector, label)` variable query: (selector's Query, label)."""
    m = _GRAFANA_LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return parse(m.group("selector") or ""), m.group("label")


GRAFANA_VARIABLES = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute_grafana_variables(expr: str) -> str:
    """Replace Grafana's template variables by values Prometheus accepts, for promtool."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in ("__rate_interval", "__interval", "__range"):
            return "5m"
        if name in ("__range_s", "__interval_ms", "__interval_s"):
            return "300"
        return ".*"  # a user variable: our dashboards use them as regex matchers only

    return GRAFANA_VARIABLES.sub(value, expr)
