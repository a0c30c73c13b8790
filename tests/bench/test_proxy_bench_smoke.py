"""bench/proxy.py end to end in its tiny configuration: it runs, writes well-formed JSON, and
chunks really flowed (engine -> proxy -> client) with the expected tool calls parsed out.

Not a speed check: the figures of a run this short on a shared machine mean nothing. Most of
its time is the three processes starting (the tokenizer loads in two of them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_proxy_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    run = subprocess.run(
        [sys.executable, "bench/proxy.py", "--tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dsml-proxy" in run.stdout  # the table was printed
    report = json.loads(out.read_text())

    cases = report["corpus"]["cases"]
    assert cases > 0 and report["corpus"]["chunks_per_completion_mean"] > 1
    # Every case once through the proxy: its streamed tool calls are the expected ones.
    assert report["warmup_check"] == {"streams": cases, "failed": 0, "examples": {}}

    streams = report["config"]["concurrency"]
    for phase in ("1_stream", f"{streams}_streams"):
        for target in ("direct", "proxy"):
            row = report[phase][target]
            assert row["requests"] > 0 and row["engine_chunks"] > 0 and row["chunks_out"] > 0
            assert row["engine_chunks_per_s"] > 0
            check = report["checks"][f"{phase}/{target}"]
            assert check["streams"] == row["requests"] and check["failed"] == 0, check
        proxy = report[phase]["proxy"]
        # Tool-call tokens are merged into fewer chat chunks, never more than engine events
        # plus the role, finish and usage chunks of each request.
        assert proxy["chunks_out"] <= proxy["engine_chunks"] + 3 * proxy["requests"]
        assert proxy["server_cpu_user_s"] + proxy["server_cpu_sys_s"] >= 0

    ttfc = report["ttfc"]
    assert ttfc["pairs"] == report["config"]["ttfc_pairs"]
    assert ttfc["direct_ms"]["p50"] > 0 and ttfc["proxy_ms"]["p50"] > 0
    assert report["targets"] and all(isinstance(t["met"], bool) for t in report["targets"])
