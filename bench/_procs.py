"""Process plumbing for bench/proxy.py: the proxy subprocess, free ports, /proc readings."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not up within {timeout_s} s")


class ProxyProcess:
    """`dsml-proxy serve --upstream URL --upstream-kind vllm` on a free loopback port.

    Run as `python -m proxy.cli` from the repository root: the same entry point as the console
    script, without depending on PATH. With `profile`, the proxy runs under cProfile and the
    stats are written there when it is stopped (SIGINT: aiohttp's graceful exit).
    """

    def __init__(self, upstream: str, *, extra_args: list[str] | None = None,
                 profile: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["serve", "--upstream", upstream, "--upstream-kind", "vllm",
                     "--host", "127.0.0.1", "--port", str(self.port), *(extra_args or [])]
        runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
        self.command = [sys.executable, *runner, "-m", "proxy.cli", *self.args]
        # Request logs go to a file: a pipe nobody reads would eventually block the proxy.
        self.log = tempfile.NamedTemporaryFile(prefix="bench-proxy-", suffix=".log")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.command, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 60) -> None:
        try:
            wait_http(self.url + "/health", timeout_s, self.proc)
        except RuntimeError:
            self.log.seek(0)
            sys.stderr.write(self.log.read().decode(errors="replace")[-4000:])
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
