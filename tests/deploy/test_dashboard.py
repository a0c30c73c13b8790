"""deploy/grafana: the dashboard JSON and its provisioning.

Every panel query is read with tests/deploy/promql.py and checked against a live scrape of
the real server: metric names, label names and label values must exist, so a renamed
metric or outcome shows up here rather than as an empty panel in production.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, TARGET_LABELS, load_yaml, run_promtool
from tests.deploy.promql import Query, parse, parse_label_values, substitute_grafana_variables

PROVISIONING = DEPLOY / "grafana" / "provisioning"

# api.md's metric table: every metric the server exports, its type and labels. The
# dashboard shows each of them (the headline first). The tool metrics also carry
# `endpoint` (issue 5: tool-turn success per protocol).
API_METRICS = {
    "dsml_proxy_requests_total": ("counter", {"endpoint", "status"}),
    "dsml_proxy_inflight_requests": ("gauge", {"endpoint"}),
    "dsml_proxy_request_duration_seconds": ("histogram", {"endpoint", "stream"}),
    "dsml_proxy_time_to_first_token_seconds": ("histogram", {"endpoint"}),
    "dsml_proxy_inter_token_latency_seconds": ("histogram", set()),
    "dsml_proxy_overhead_seconds": ("histogram", {"endpoint"}),
    "dsml_proxy_tokens_total": ("counter", {"kind"}),
    "dsml_proxy_upstream_errors_total": ("counter", {"reason"}),
    "dsml_proxy_tool_turns_total": ("counter", {"endpoint", "outcome"}),
    "dsml_proxy_tool_calls_total": ("counter", {"endpoint", "outcome"}),
    "dsml_proxy_dsml_repairs_total": ("counter", {"kind"}),
    "dsml_proxy_build_info": ("gauge", {"version", "dialect", "backend"}),
}
TOOL_TURN_SUCCESS = {"tool_calls", "answer", "recovered_from_thinking", "recovered_empty"}
TOOL_TURN_FAILURE = {"malformed", "truncated", "empty"}
# The endpoints that run DSML turns: the `endpoint` values of the tool metrics.
TURN_ENDPOINTS = {"chat_completions", "messages", "responses"}
# Tool metrics whose panels may sum over `endpoint`: the headline is the overall success
# rate, and outcome breakdowns stay readable; the per-protocol panel splits tool turns.
SUMMED_OVER_ENDPOINTS = {"dsml_proxy_tool_turns_total", "dsml_proxy_tool_calls_total"}
RATE_FUNCTIONS = {"rate", "irate", "increase"}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def queries(dashboard: dict) -> list[tuple[str, dict]]:
    """(panel title, target) for every query target of every panel."""
    return [(p["title"], t) for p in panels(dashboard) for t in p.get("targets", [])]


def datasource_uid() -> str:
    (ds,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    return ds["uid"]


# ------------------------------------------------------------------- structure, offline


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] == "dsml-proxy" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']!r} has no query"
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), p["title"]


def test_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_provisioned_datasource_by_uid(dashboard):
    uid = datasource_uid()
    things = [p for p in panels(dashboard) if p["type"] != "row"]
    things += [t for _, t in queries(dashboard)]
    things += dashboard["templating"]["list"]
    for thing in things:
        assert thing["datasource"] == {"type": "prometheus", "uid": uid}, thing


def test_headline_is_the_tool_turn_success_rate(dashboard):
    first = next(p for p in dashboard["panels"] if p["type"] != "row")
    assert "success" in first["title"].lower() and first["type"] == "stat"
    (target,) = first["targets"]
    q = parse(target["expr"])
    assert {s.name for s in q.selectors} == {"dsml_proxy_tool_turns_total"}
    numerator, denominator = q.selectors
    (outcomes,) = [m for m in numerator.matchers if m.label == "outcome"]
    assert outcomes.op == "=~" and set(outcomes.value.split("|")) == TOOL_TURN_SUCCESS
    assert not [m for m in denominator.matchers if m.label == "outcome"], "denominator: all turns"
    assert not q.grouping_labels, "the headline is one number: summed over every endpoint"
    assert not [m for s in q.selectors for m in s.matchers if m.label == "endpoint"]
    assert first["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_tool_turn_success_per_protocol(dashboard):
    # Issue 5: the dashboard shows tool-turn success per protocol.
    (panel,) = [p for p in panels(dashboard) if p["title"] == "Tool-turn success rate by protocol"]
    (target,) = panel["targets"]
    q = parse(target["expr"])
    numerator, denominator = q.selectors
    assert numerator.name == denominator.name == "dsml_proxy_tool_turns_total"
    (outcomes,) = [m for m in numerator.matchers if m.label == "outcome"]
    assert outcomes.op == "=~" and set(outcomes.value.split("|")) == TOOL_TURN_SUCCESS
    assert not [m for m in denominator.matchers if m.label == "outcome"]
    # Both sides `sum by (endpoint)`, so the division matches endpoint to endpoint.
    assert target["expr"].count("sum by (endpoint) (") == 2, target["expr"]
    assert q.grouping_labels == {"endpoint"} and target["legendFormat"] == "{{endpoint}}"
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_dashboard_shows_every_api_metric(dashboard):
    used = set()
    for _, t in queries(dashboard):
        for s in parse(t["expr"]).selectors:
            used.add(re.sub(r"_(bucket|sum|count)$", "", s.name))
    assert set(API_METRICS) <= used, f"not shown: {sorted(set(API_METRICS) - used)}"


def test_per_protocol_breakdown_wherever_the_metric_has_an_endpoint(dashboard):
    for title, t in queries(dashboard):
        q = parse(t["expr"])
        for s in q.selectors:
            base = re.sub(r"_(bucket|sum|count)$", "", s.name)
            if base not in API_METRICS:  # the engine's series: no endpoint label
                assert base.startswith("dsml_proxy_engine_"), f"{title!r}: unknown {base}"
                continue
            if "endpoint" in API_METRICS[base][1] and base not in SUMMED_OVER_ENDPOINTS:
                assert "endpoint" in q.grouping_labels, f"{title!r}: split it by endpoint"


def test_legends_name_only_grouped_labels(dashboard):
    for title, t in queries(dashboard):
        q = parse(t["expr"])
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
            assert label in q.grouping_labels, f"{title!r}: legend uses {label} not in by()"


def test_counters_and_histograms_are_rated(dashboard):
    for title, t in queries(dashboard):
        for s in parse(t["expr"]).selectors:
            if re.search(r"_(total|bucket|sum|count)$", s.name):
                assert RATE_FUNCTIONS & set(s.functions), f"{title!r}: raw counter {s.name}"
            if s.name.endswith("_bucket"):
                assert "histogram_quantile" in s.functions, title


def test_every_query_is_valid_promql(dashboard, promtool, tmp_path):
    # promtool has no "check expression"; a rule file with one recording rule per panel
    # query makes `promtool check rules` parse every expression.
    rules = [{"record": f"dashboard:panel_{i}", "expr": substitute_grafana_variables(t["expr"])}
             for i, (_, t) in enumerate(queries(dashboard))]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run_promtool(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    (ds,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    scrape_interval = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape_interval
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "dsml-proxy.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# ------------------------------------------------------------------- against the live server


def check_query(q: Query, scrape, where: str) -> None:
    for s in q.selectors:
        assert s.name in scrape.families, f"{where}: {s.name} is not exported by the server"
        series = scrape.labels[s.name]
        exported = set().union(*series)
        for m in s.matchers:
            if m.label in TARGET_LABELS:
                continue
            assert m.label in exported, f"{where}: {s.name} has no label {m.label!r}"
            values = {labels[m.label] for labels in series if m.label in labels}
            if m.op == "=":
                assert m.value in values, f"{where}: {s.name}{{{m.label}={m.value!r}}} never exported"
            elif m.op == "=~":
                if re.fullmatch(r"[\w|]+", m.value):  # a list of literals: each must exist
                    missing = set(m.value.split("|")) - values
                    assert not missing, f"{where}: {s.name} has no {m.label} {sorted(missing)}"
                else:
                    assert any(re.fullmatch(m.value, v) for v in values), \
                        f"{where}: {m.label}=~{m.value!r} matches no exported value"
    exported = set().union(*(set().union(*scrape.labels[s.name]) for s in q.selectors))
    for label in q.grouping_labels - TARGET_LABELS - {"le"}:
        assert label in exported, f"{where}: grouping by {label!r}, which no selected metric has"


def test_every_panel_query_uses_exported_series(dashboard, scrape, engine_scrape):
    """Against the server in front of an upstream; the engine panels (`dsml_proxy_engine_*`,
    exported by the embedded engine alone) against one serving the demo checkpoint."""
    engine_panels = 0
    for title, t in queries(dashboard):
        q = parse(t["expr"])
        engine = {s.name.startswith("dsml_proxy_engine_") for s in q.selectors}
        assert len(engine) == 1, f"panel {title!r} mixes engine and API series"
        engine_panels += engine == {True}
        check_query(q, engine_scrape if engine == {True} else scrape, f"panel {title!r}")
    assert engine_panels, "no panel shows the embedded engine (prefix-cache hit rate)"


def test_template_variables_use_exported_series(dashboard, scrape):
    for var in dashboard["templating"]["list"]:
        q, label = parse_label_values(var["query"]["query"])
        check_query(q, scrape, f"variable {var['name']!r}")
        assert var["definition"] == var["query"]["query"]
        assert label in TARGET_LABELS or label in set().union(*scrape.labels[q.selectors[0].name])


@pytest.mark.parametrize("name", sorted(API_METRICS))
def test_server_exports_the_api_metrics_the_dashboard_relies_on(scrape, name):
    kind, labels = API_METRICS[name]
    sample = name + ("_count" if kind == "histogram" else "")
    assert sample in scrape.families, f"{name} missing from /metrics"
    assert scrape.families[sample] == kind, f"{name} is a {scrape.families[sample]}, not {kind}"
    if kind == "histogram":
        assert name + "_bucket" in scrape.families and name + "_sum" in scrape.families
    exported = set().union(*scrape.labels[sample])
    assert exported == labels, f"{name} labels {sorted(exported)} != api.md {sorted(labels)}"


def test_tool_turn_outcomes_are_preinitialised(scrape):
    # The success ratio needs every outcome present from the start (api.md: every label
    # combination pre-initialised to zero), or rate() has nothing to divide.
    series = {(s["endpoint"], s["outcome"]) for s in scrape.labels["dsml_proxy_tool_turns_total"]}
    assert series == {(e, o) for e in TURN_ENDPOINTS for o in TOOL_TURN_SUCCESS | TOOL_TURN_FAILURE}
