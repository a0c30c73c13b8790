"""The server starts the way the image starts it: `dsml-proxy serve` (ENTRYPOINT + CMD)
configured only by the DSML_PROXY_* variables of the Dockerfile and docker-compose.yml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import free_port, http_get, server_env, start_server
from tests.deploy.test_compose import compose, resolve
from tests.deploy.test_dockerfile import final


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The server's working directory, with an empty HOME inside (the image's WORKDIR is
    its user's home)."""
    path = tmp_path_factory.mktemp("workdir")
    (path / "home").mkdir()
    return path


@pytest.fixture(scope="module")
def env_configured_server(tmp_path_factory, workdir):
    env = {k: resolve(v) for k, v in compose()["services"]["proxy"]["environment"].items()}
    # Loopback only, a port of our own (not the image's 8000) and an upstream nothing
    # listens on; everything else as the compose file sets it.
    port = free_port()
    env.update(DSML_PROXY_HOST="127.0.0.1", DSML_PROXY_PORT=str(port),
               DSML_PROXY_UPSTREAM=f"http://127.0.0.1:{free_port()}")
    args = json.loads(final("CMD")[0])
    yield from start_server(args, server_env(HOME=str(workdir / "home"), **env), port,
                            tmp_path_factory.mktemp("env-server") / "server.log", cwd=workdir)


def test_configured_by_environment_alone(env_configured_server):
    # start_server already waited for /health on DSML_PROXY_PORT: the port came from the
    # environment. The rest of the compose settings show up in build_info.
    status, text = http_get(env_configured_server.base_url + "/metrics")
    assert status == 200
    (info,) = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "dsml_proxy_build_info"]
    compose_env = compose()["services"]["proxy"]["environment"]
    assert info.labels["dialect"] == resolve(compose_env["DSML_PROXY_DIALECT"])
    assert resolve(compose_env["DSML_PROXY_UPSTREAM_KIND"]) in info.labels["backend"]
    assert info.value == 1


def test_models_lists_the_configured_model_name(env_configured_server):
    status, text = http_get(env_configured_server.base_url + "/v1/models")
    assert status == 200, text
    ids = {m["id"] for m in json.loads(text)["data"]}
    assert resolve(compose()["services"]["proxy"]["environment"]["DSML_PROXY_MODEL_NAME"]) in ids


def test_writes_nothing_but_tmp(env_configured_server, workdir):
    # deploy/k8s runs the container with a read-only root filesystem and only /tmp
    # writable: the server must not create files in its working directory or HOME
    # (caches, pid files) while starting and serving.
    for path in ("/health", "/ready", "/metrics", "/v1/models"):
        http_get(env_configured_server.base_url + path)
    created = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert created == ["home"], f"the server wrote {created}"
