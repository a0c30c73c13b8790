"""deploy/prometheus: scrape config, alert rules and their promtool unit tests, and the
server's exposition format (`promtool check metrics` on a live scrape)."""

from __future__ import annotations

from tests.deploy.conftest import DEPLOY, load_yaml, run_promtool
from tests.deploy.promql import parse
from tests.deploy.test_dashboard import TOOL_TURN_SUCCESS
from tests.deploy.test_dashboard import check_query as check_exported

PROMETHEUS = DEPLOY / "prometheus"
REQUIRED_ALERTS = {
    "DsmlProxyToolTurnSuccessLow": "dsml_proxy_tool_turns_total",
    "DsmlProxyUpstreamErrorRatioHigh": "dsml_proxy_upstream_errors_total",
    "DsmlProxyTimeToFirstTokenP99High": "dsml_proxy_time_to_first_token_seconds_bucket",
    "DsmlProxyDown": "up",
}
# Series Prometheus itself creates for each target; the rest must come from the server.
PROMETHEUS_SERIES = {"up"}


def rules(alert_rules: dict) -> list[dict]:
    return [r for g in alert_rules["groups"] for r in g["rules"]]


def test_promtool_check_config(promtool):
    # Also loads and checks the rule files the config names.
    r = run_promtool(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout


def test_promtool_check_rules(promtool, alert_rules):
    r = run_promtool(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules(alert_rules))} rules found" in r.stdout


def test_promtool_unit_tests_of_the_alerts(promtool, alert_rules):
    r = run_promtool(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every alert is exercised by at least one firing case.
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {r["alert"] for r in rules(alert_rules)}


def test_required_alerts_exist_with_severity_and_text(alert_rules):
    by_name = {r["alert"]: r for r in rules(alert_rules)}
    assert set(REQUIRED_ALERTS) <= set(by_name)
    for name, metric in REQUIRED_ALERTS.items():
        rule = by_name[name]
        assert metric in {s.name for s in parse(rule["expr"]).selectors}, name
    for rule in by_name.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule, f"{rule['alert']}: without `for` one bad scrape pages someone"


def test_tool_turn_alert_counts_recovered_turns_as_success(alert_rules):
    (rule,) = [r for r in rules(alert_rules) if r["alert"] == "DsmlProxyToolTurnSuccessLow"]
    (numerator, *_) = parse(rule["expr"]).selectors
    (m,) = [m for m in numerator.matchers if m.label == "outcome"]
    assert set(m.value.split("|")) == TOOL_TURN_SUCCESS


def test_tool_turn_alert_sums_over_endpoints(alert_rules):
    # Tool-turn series carry `endpoint` (issue 5); the alert is on the overall figure, so
    # every aggregation keeps only `job` and nothing filters an endpoint out.
    (rule,) = [r for r in rules(alert_rules) if r["alert"] == "DsmlProxyToolTurnSuccessLow"]
    q = parse(rule["expr"])
    assert q.grouping_labels == {"job"}
    assert not [m for s in q.selectors for m in s.matchers if m.label == "endpoint"]
    assert rule["expr"].count("sum by (job) (") == len(q.selectors)


def test_scrape_job_matches_the_down_alert_and_the_compose_service(alert_rules):
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (down,) = [r for r in rules(alert_rules) if r["alert"] == "DsmlProxyDown"]
    (up,) = parse(down["expr"]).selectors
    assert {(m.label, m.value) for m in up.matchers} == {("job", job["job_name"])}
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.split(":")
    assert host in compose["services"], f"scrape target {target}: no compose service {host}"
    assert port == compose["services"][host]["environment"]["DSML_PROXY_PORT"]


def test_alert_expressions_use_exported_series(alert_rules, scrape):
    for rule in rules(alert_rules):
        q = parse(rule["expr"])
        q.selectors = [s for s in q.selectors if s.name not in PROMETHEUS_SERIES]
        check_exported(q, scrape, f"alert {rule['alert']}")


def test_promtool_check_metrics_on_a_live_scrape(promtool, scrape):
    # The exposition format and Prometheus' naming conventions (units, _total, help).
    r = run_promtool(promtool, "check", "metrics", stdin=scrape.text)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
