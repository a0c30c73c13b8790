"""Settings precedence, the CLI's flags, and the real console script serving requests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import settings_from_args
from proxy.settings import Settings, UpstreamKind
from tests.fakes.upstream import FakeUpstream, refused_url


def test_flags_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('port = 9100\nmodel_name = "from-toml"\nmax_queue = 7\n'
                      'upstream = "http://127.0.0.1:1"\n')
    monkeypatch.setenv("DSML_PROXY_MODEL_NAME", "from-env")
    monkeypatch.setenv("DSML_PROXY_API_KEYS", "k1,k2")
    s = settings_from_args(["serve", "--config", str(config), "--port", "9200",
                            "--upstream-kind", "sglang", "--no-recover-empty-turns"])
    assert s.port == 9200  # flag beats TOML
    assert s.model_name == "from-env"  # env beats TOML
    assert s.max_queue == 7  # TOML beats default
    assert s.upstream_kind is UpstreamKind.SGLANG
    assert s.recover_empty_turns is False
    assert s.api_key_values() == [b"k1", b"k2"]
    assert Settings().recover_empty_turns is True


@pytest.mark.parametrize(("flag", "field", "env", "toml_key"), [
    ("--response-store-size", "response_store_size", "DSML_PROXY_RESPONSE_STORE_SIZE",
     "response_store_size"),
    ("--response-store-ttl", "response_store_ttl_s", "DSML_PROXY_RESPONSE_STORE_TTL_S",
     "response_store_ttl_s"),
    ("--keepalive-interval", "keepalive_interval_s", "DSML_PROXY_KEEPALIVE_INTERVAL_S",
     "keepalive_interval_s"),
])
def test_store_and_keepalive_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        flag: str, field: str, env: str, toml_key: str) -> None:
    for k in [k for k in os.environ if k.startswith("DSML_PROXY_")]:
        monkeypatch.delenv(k)
    config = tmp_path / "proxy.toml"
    default = Settings.model_fields[field].default
    assert getattr(settings_from_args(["serve"]), field) == default
    config.write_text(f"{toml_key} = 11\n")
    base = ["serve", "--config", str(config)]
    assert getattr(settings_from_args(base), field) == 11  # TOML beats the default
    monkeypatch.setenv(env, "22")
    assert getattr(settings_from_args(base), field) == 22  # env beats TOML
    assert getattr(settings_from_args([*base, flag, "33"]), field) == 33  # flag beats env
    with pytest.raises(SystemExit):
        settings_from_args(["serve", flag, "soon"])  # argparse: not a number


def test_no_flag_for_the_signing_secret(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--reasoning-signing-secret", "s3cret"])
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "DSML_PROXY_REASONING_SIGNING_SECRET" in help_text and "`ps`" in help_text
    for flag in ("--response-store-size", "--response-store-ttl", "--keepalive-interval"):
        assert flag in help_text


def test_bad_settings_fail_early() -> None:
    with pytest.raises(ValueError):
        Settings(dialect="v9")
    with pytest.raises(ValueError):
        Settings(upstream_prompt="tokens")
    with pytest.raises(ValueError):
        Settings(unknown_setting=1)


def test_engine_path_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args(["serve"]).engine_path == "auto"
    monkeypatch.setenv("DSML_PROXY_ENGINE_PATH", "fast")
    assert settings_from_args(["serve"]).engine_path == "fast"
    assert settings_from_args(["serve", "--engine-path", "reference"]).engine_path == "reference"
    with pytest.raises(SystemExit):
        settings_from_args(["serve", "--engine-path", "triton"])  # argparse: not a choice
    with pytest.raises(ValueError):
        Settings(engine_path="quick")


async def _wait_http(url: str, proc: asyncio.subprocess.Process) -> int:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.returncode is not None:
                raise AssertionError(f"server exited with {proc.returncode}")
            try:
                async with session.get(url) as resp:
                    return resp.status
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    raise AssertionError("server did not start")


async def test_console_script_serves(fake: FakeUpstream) -> None:
    port = int(refused_url().rsplit(":", 1)[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSML_PROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from proxy.cli import main; main()", "serve",
        "--upstream", fake.url, "--port", str(port), "--model-name", "smoke",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        assert await _wait_http(base + "/health", proc) == 200
        fake.push("Hmm.</think>Hello!<｜end▁of▁sentence｜>")
        async with aiohttp.ClientSession() as session, session.post(
            base + "/v1/chat/completions", headers={"X-Request-Id": "req-smoke-1"},
            json={"model": "smoke", "messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == "req-smoke-1"
            body = await resp.json()
        assert body["choices"][0]["message"]["content"] == "Hello!"
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    log = stderr.decode()
    # One JSON line per request, carrying the request id.
    assert '"request_id": "req-smoke-1"' in log and '"status": 200' in log
