"""deploy/docker-compose.yml: the proxy, Prometheus and Grafana wired to each other and to
the files in deploy/ (every mounted host path exists, every address names a service)."""

from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import DEPLOY, ROOT, check_settings_env, load_yaml

COMPOSE_FILE = DEPLOY / "docker-compose.yml"


def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


def resolve(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of the bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        host, container, *_ = v.split(":")
        if host.startswith("."):
            out[container] = host
    return out


def test_services():
    services = compose()["services"]
    assert {"proxy", "prometheus", "grafana"} <= set(services)
    for name, s in services.items():
        assert "image" in s, f"{name}: no image"


def test_proxy_is_built_from_the_dockerfile_at_the_repository_root():
    build = compose()["services"]["proxy"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert build["args"]["VARIANT"] in ("cpu", "cuda")


def test_proxy_port_and_configuration():
    proxy = compose()["services"]["proxy"]
    env = {k: resolve(v) for k, v in proxy["environment"].items()}
    assert env["DSML_PROXY_PORT"] == "8000" and env["DSML_PROXY_HOST"] == "0.0.0.0"
    assert f"8000:{env['DSML_PROXY_PORT']}" in proxy["ports"]
    check_settings_env(env, "docker-compose proxy")


def test_every_bind_mount_exists():
    for name, service in compose()["services"].items():
        for container, host in mounts(service).items():
            assert (DEPLOY / host).exists(), f"{name}: {host} (mounted at {container}) missing"


def test_prometheus_reads_the_mounted_config():
    prom = compose()["services"]["prometheus"]
    (flag,) = [c for c in prom["command"] if c.startswith("--config.file=")]
    config = flag.split("=", 1)[1]
    folder, filename = config.rsplit("/", 1)
    assert (DEPLOY / mounts(prom)[folder] / filename).is_file()
    assert "9090:9090" in prom["ports"]


def test_grafana_provisioning_and_dashboards_are_mounted_where_grafana_looks():
    grafana = compose()["services"]["grafana"]
    m = mounts(grafana)
    provisioning = DEPLOY / m["/etc/grafana/provisioning"]
    assert (provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir()
    (provider,) = load_yaml(provisioning / "dashboards" / "dsml-proxy.yml")["providers"]
    dashboards = DEPLOY / m[provider["options"]["path"]]
    assert (dashboards / "dsml-proxy.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, filename = home.rsplit("/", 1)
    assert (DEPLOY / m[folder] / filename).is_file()
    (ds,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host in compose()["services"] and f"{port}:{port}" in compose()["services"][host]["ports"]


def commented_service(name: str) -> dict:
    """The commented-out example service `name`, uncommented and parsed."""
    lines = COMPOSE_FILE.read_text().splitlines()
    start = lines.index(f"  # {name}:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #") or line.strip() == "#":
            break
        block.append(line.replace("  # ", "  ", 1))
    return yaml.safe_load("\n".join(block))[name]


def test_example_upstreams_are_valid_services_serving_deepseek_v4_flash():
    vllm = commented_service("vllm")
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert "--model=deepseek-ai/DeepSeek-V4-Flash" in vllm["command"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    sglang = commented_service("sglang")
    assert "deepseek-ai/DeepSeek-V4-Flash" in sglang["command"]
    # The header tells users to set DSML_PROXY_UPSTREAM=http://vllm:8000 after uncommenting.
    assert "DSML_PROXY_UPSTREAM=http://vllm:8000" in COMPOSE_FILE.read_text()
    assert "--port=8000" in vllm["command"] and "--port 8000" in sglang["command"]
