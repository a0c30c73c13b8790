"""Process plumbing for bench/proxy.py: the proxy subprocess, free ports, /proc readings."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far: fields 14 and 15 of /proc/<pid>/stat.

    System time matters here: on loopback, a send() runs the receiver's TCP path too."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on, from /proc (None while it has none).

    The proxy is started with `--port 0` and found this way: a port picked here and handed
    over would be free for anyone else's server in between (other jobs share this machine).
    """
    inodes = set()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    return int(fields[1].rsplit(":", 1)[1], 16)
    return None


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
    script, without depending on PATH. With `profile`, it runs under cProfile with a CPU-time
    clock (bench/_proxy_profiled.py) and the stats are written there when it is stopped.
    """

    def __init__(self, upstream: str, *, extra_args: list[str] | None = None,
                 profile: Path | None = None, cwd: Path = REPO) -> None:
        self.url = ""
        self.args = ["serve", "--upstream", upstream, "--upstream-kind", "vllm",
                     "--host", "127.0.0.1", "--port", "0", *(extra_args or [])]
        module = ["bench._proxy_profiled", str(profile)] if profile else ["proxy.cli"]
        self.command = [sys.executable, "-m", *module, *self.args]
        # Request logs go to a file: a pipe nobody reads would eventually block the proxy.
        self.log = tempfile.NamedTemporaryFile(prefix="bench-proxy-", suffix=".log")  # noqa: SIM115 (closed in stop())
        # `cwd`: the tree whose `proxy`, `dsml` and `schemas` packages run (python -m puts it
        # first on sys.path), e.g. a frozen copy of an older proxy (bench/_ttfc_ab.py).
        self.proc = subprocess.Popen(self.command, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            while (port := listening_port(self.pid)) is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the proxy did not start listening")
                time.sleep(0.05)
            self.url = f"http://127.0.0.1:{port}"
            wait_http(self.url + "/health", deadline - time.monotonic(), self.proc)
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
