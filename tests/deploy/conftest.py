"""Shared fixtures for the deploy checks: the files, promtool, and the real server.

The live server is started the way the container starts it (`dsml-proxy serve`) on
127.0.0.1 with its upstream pointed at a closed port: /health and /metrics answer without
an engine, which is all the dashboard and alert checks need.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dsml-proxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

PROMTOOL_MISSING = (
    "promtool is not on PATH, and the deploy checks need it. Install it with "
    "`apt-get install -y --no-install-recommends prometheus` (Debian/Ubuntu ship promtool "
    "in that package) or put the promtool binary from https://prometheus.io/download/ on PATH."
)
# Labels Prometheus attaches to every scraped series (the target's labels), so they are
# never in the server's own exposition but may be used in any query.
TARGET_LABELS = {"job", "instance"}
# What the Prometheus operator adds on top for a ServiceMonitor target.
OPERATOR_TARGET_LABELS = TARGET_LABELS | {"namespace", "service", "pod", "container", "endpoint"}
SERVER_START_TIMEOUT_S = 90.0  # loading the V4 tokenizer takes a few seconds on a busy box


def free_port() -> int:
    """A port nothing listens on (the OS picked it and we released it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_yaml_documents(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_yaml(path: Path):
    (doc,) = load_yaml_documents(path)
    return doc


@pytest.fixture(scope="session")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="session")
def alert_rules() -> dict:
    return load_yaml(ALERTS)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(PROMTOOL_MISSING, pytrace=False)
    return path


def run_promtool(promtool: str, *args: str, stdin: str | None = None,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], input=stdin, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def dsml_proxy_command() -> list[str]:
    """The console script of this environment (the image's ENTRYPOINT is the same script)."""
    script = Path(sys.executable).with_name("dsml-proxy")
    if not script.exists():
        pytest.fail(f"{script} not found: install the project (`pip install -e .`) so the "
                    "`dsml-proxy` console script exists", pytrace=False)
    return [str(script)]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen


def start_server(args: list[str], env: dict[str, str], port: int, log_path: Path,
                 cwd: Path | None = None) -> Iterator[LiveServer]:
    """Start `dsml-proxy <args>`, wait for /health, yield it, then stop it."""
    log = log_path.open("wb")
    proc = subprocess.Popen([*dsml_proxy_command(), *args], env=env, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dsml-proxy {' '.join(args)} exited with {proc.returncode}:\n"
                            + log_path.read_text()[-3000:], pytrace=False)
            try:
                if http_get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dsml-proxy did not answer /health within "
                            f"{SERVER_START_TIMEOUT_S:.0f} s:\n" + log_path.read_text()[-3000:],
                            pytrace=False)
            time.sleep(0.2)
        yield LiveServer(base, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def server_env(**overrides: str) -> dict[str, str]:
    # The parent's DSML_PROXY_* variables must not leak into the server under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSML_PROXY_")}
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    port = free_port()
    args = ["serve", "--upstream", f"http://127.0.0.1:{free_port()}", "--upstream-kind", "vllm",
            "--host", "127.0.0.1", "--port", str(port)]
    yield from start_server(args, server_env(), port,
                            tmp_path_factory.mktemp("server") / "server.log")


@pytest.fixture(scope="session")
def live_engine_server(tmp_path_factory) -> Iterator[LiveServer]:
    """The embedded engine on its tiny demo checkpoint: the only backend that exports the
    `dsml_proxy_engine_*` series."""
    port = free_port()
    args = ["serve", "--demo", "--host", "127.0.0.1", "--port", str(port)]
    env = server_env(DSML_PROXY_DEMO_DIR=str(tmp_path_factory.mktemp("demo")))
    yield from start_server(args, env, port,
                            tmp_path_factory.mktemp("engine-server") / "server.log")


@dataclass
class Scrape:
    text: str
    families: dict[str, str]  # sample name -> family type (counter, gauge, histogram, ...)
    labels: dict[str, list[dict[str, str]]]  # sample name -> label sets of its samples


@pytest.fixture(scope="session")
def scrape(live_server: LiveServer) -> Scrape:
    return _scrape(live_server)


@pytest.fixture(scope="session")
def engine_scrape(live_engine_server: LiveServer) -> Scrape:
    return _scrape(live_engine_server)


def _scrape(live_server: LiveServer) -> Scrape:
    status, text = http_get(live_server.base_url + "/metrics")
    assert status == 200, f"GET /metrics answered {status}: {text[:500]}"
    families: dict[str, str] = {}
    labels: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families[sample.name] = family.type
            labels.setdefault(sample.name, []).append(dict(sample.labels))
    return Scrape(text, families, labels)


def settings_env_names() -> set[str]:
    """DSML_PROXY_<FIELD> for every field of the server's one settings object."""
    from proxy.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    return {prefix + name.upper() for name in Settings.model_fields}


def check_settings_env(env: dict[str, str], where: str) -> None:
    """Every DSML_PROXY_* variable names a real setting, and the values validate."""
    from proxy.settings import Settings

    unknown = {k for k in env if k.startswith("DSML_PROXY_")} - settings_env_names()
    assert not unknown, f"{where}: {sorted(unknown)} are not settings of proxy/settings.py"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DSML_PROXY_")}
    try:
        os.environ.update(env)
        Settings()  # raises pydantic's ValidationError naming the bad variable
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)
