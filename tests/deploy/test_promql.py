"""The PromQL reader the dashboard and alert checks rely on: if it missed a selector, a
wrong metric name could pass unnoticed."""

import pytest

from tests.deploy.promql import (
    Matcher,
    parse,
    parse_label_values,
    substitute_grafana_variables,
)


def names(expr: str) -> list[str | None]:
    return [s.name for s in parse(expr).selectors]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", ["up"]),
        ('up{job="dsml-proxy"} == 0', ["up"]),
        ("rate(a_total[5m]) / rate(b_total[$__rate_interval])", ["a_total", "b_total"]),
        ("sum by (job, le) (rate(h_bucket[5m]))", ["h_bucket"]),
        ("sum(rate(h_bucket[5m])) by (le)", ["h_bucket"]),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[10m]))) > 30", ["h_bucket"]),
        ("a and on (job) group_left (x) b offset 5m", ["a", "b"]),
        ("a > bool 1 unless b", ["a", "b"]),
        ('{__name__="c_total", k="v"}', ["c_total"]),
        ('x{k="a}b", j=~"[45].."}', ["x"]),  # braces inside strings
        ("max without (instance) (g) * 1e3 + 0x1f", ["g"]),
        ("absent(up)", ["up"]),
        ("topk(5, sum by (kind) (rate(t_total[1h:5m])))", ["t_total"]),
        ("time() - process_start_time_seconds", ["process_start_time_seconds"]),
    ],
)
def test_selector_names(expr, expected):
    assert names(expr) == expected


def test_matchers_functions_and_grouping():
    q = parse('sum by (outcome) (rate(t_total{instance=~"$instance", outcome!="empty"}[5m]))')
    (sel,) = q.selectors
    assert sel.matchers == [Matcher("instance", "=~", "$instance"), Matcher("outcome", "!=", "empty")]
    assert sel.functions == ["sum", "rate"]
    assert q.grouping_labels == {"outcome"}


def test_label_values_query():
    q, label = parse_label_values("label_values(dsml_proxy_build_info, instance)")
    assert [s.name for s in q.selectors] == ["dsml_proxy_build_info"] and label == "instance"


def test_unbalanced_and_unreadable_expressions_are_errors():
    with pytest.raises(ValueError):
        parse("sum(rate(x[5m])")
    with pytest.raises(ValueError):
        parse("x{k=v}")  # an unquoted label value is not PromQL


def test_grafana_variables_become_valid_promql():
    out = substitute_grafana_variables('rate(x{i=~"$instance", j=~"${job}"}[$__rate_interval]) '
                                       '/ increase(y[$__range])')
    assert out == 'rate(x{i=~".*", j=~".*"}[5m]) / increase(y[5m])'
