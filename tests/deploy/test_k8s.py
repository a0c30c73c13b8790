"""deploy/k8s: manifests parse, reference each other consistently, match the server
(port, probe paths, settings) and the image, and the generated copies of the alert rules
and the dashboard are in sync with their sources."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy.conftest import (
    ALERTS,
    DASHBOARD,
    DEPLOY,
    OPERATOR_TARGET_LABELS,
    TARGET_LABELS,
    check_settings_env,
    http_get,
    load_yaml,
    load_yaml_documents,
)
from tests.deploy.test_dockerfile import final as dockerfile_final

K8S = DEPLOY / "k8s"


def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind, from the files kustomization.yaml lists."""
    out = {}
    for name in load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in load_yaml_documents(K8S / name):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


def container() -> dict:
    (c,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def env() -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container()["env"]}


def test_kustomization_lists_every_manifest():
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def test_every_object_has_the_required_fields():
    kinds = manifests()
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                          "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap"}
    for kind, obj in kinds.items():
        assert obj["apiVersion"] and obj["metadata"]["name"], kind
        assert "spec" in obj or kind == "ConfigMap", kind


def test_selectors_match_the_pods():
    k = manifests()
    pod_labels = k["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind, selector in [
        ("Deployment", k["Deployment"]["spec"]["selector"]["matchLabels"]),
        ("Service", k["Service"]["spec"]["selector"]),
        ("PodDisruptionBudget", k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
    ]:
        assert selector.items() <= pod_labels.items(), f"{kind} selects no proxy pod"
    sm = k["ServiceMonitor"]["spec"]
    assert sm["selector"]["matchLabels"].items() <= k["Service"]["metadata"]["labels"].items()


def test_ports_and_probes_match_the_server():
    c = container()
    (port,) = c["ports"]
    assert port["containerPort"] == 8000 == int(env()["DSML_PROXY_PORT"])
    assert env()["DSML_PROXY_HOST"] == "0.0.0.0"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe
    k = manifests()
    (svc_port,) = k["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] in (port["name"], port["containerPort"])
    (endpoint,) = k["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"


def test_container_matches_the_image():
    c = container()
    assert c["image"].split(":")[0] == load_yaml(K8S / "kustomization.yaml")["images"][0]["name"]
    assert c["args"] == json.loads(dockerfile_final("CMD")[0])
    sc = manifests()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    (uid,) = dockerfile_final("USER")
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == int(uid)
    (useradd,) = [a for a in dockerfile_final("RUN") if "useradd" in a]
    assert f"--uid {uid} --gid {sc['runAsGroup']}" in useradd


def test_environment_names_real_settings():
    values = {k: v for k, v in env().items() if v is not None}  # secretKeyRef ones excluded
    check_settings_env(values, "k8s Deployment")
    (keys,) = [e for e in container()["env"] if e["name"] == "DSML_PROXY_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True  # no Secret: no auth
    assert env()["DSML_PROXY_UPSTREAM"].startswith("http://")


def test_scaling_and_disruption_budget():
    k = manifests()
    hpa, deploy = k["HorizontalPodAutoscaler"]["spec"], k["Deployment"]
    assert hpa["scaleTargetRef"] == {"apiVersion": deploy["apiVersion"], "kind": "Deployment",
                                     "name": deploy["metadata"]["name"]}
    assert 2 <= hpa["minReplicas"] <= deploy["spec"]["replicas"] <= hpa["maxReplicas"]
    (cpu,) = [m for m in hpa["metrics"] if m["type"] == "Resource"]
    # A CPU utilisation target is relative to the pods' CPU request: without one, no scaling.
    assert cpu["resource"]["name"] == "cpu" and container()["resources"]["requests"]["cpu"]
    pdb = k["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_graceful_shutdown_outlasts_the_pre_stop_delay():
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    sleep = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) < spec["terminationGracePeriodSeconds"]


def test_prometheus_job_name_is_the_service_name(alert_rules):
    # The operator names the job after the Service; the alerts and the compose setup use it.
    job = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"][0]["job_name"]
    assert manifests()["Service"]["metadata"]["name"] == job


def test_operator_target_labels_do_not_hide_the_servers_labels(scrape):
    # The operator adds namespace/service/pod/container/endpoint to every series; a clash
    # with a label the server exports renames the server's (exported_<name>) unless
    # honorLabels is set, and the dashboard's `by (endpoint)` would break.
    exported = set().union(*(set().union(*ls) for ls in scrape.labels.values()))
    clashes = exported & (OPERATOR_TARGET_LABELS - TARGET_LABELS)
    assert clashes == {"endpoint"}, clashes  # api.md's per-protocol label
    (endpoint,) = manifests()["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint.get("honorLabels") is True


def test_prometheus_rule_is_the_alert_file():
    rule = manifests()["PrometheusRule"]
    assert rule["spec"] == load_yaml(ALERTS)


def test_dashboard_configmap_is_the_dashboard():
    cm = manifests()["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert key == DASHBOARD.name
    assert json.loads(cm["data"][key]) == json.loads(DASHBOARD.read_text())


def test_generated_files_are_up_to_date():
    r = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("path", "expected"), [("/health", 200), ("/metrics", 200),
                                                ("/ready", 503)])
def test_probe_and_scrape_paths_answer_on_the_live_server(live_server, path, expected):
    # The live server's upstream is a closed port: alive and scrapable, but not ready, so
    # the readiness probe takes a replica that cannot reach its engine out of the Service.
    status, _ = http_get(live_server.base_url + path)
    assert status == expected
