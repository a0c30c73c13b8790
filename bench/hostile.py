"""Hostile input against the real server (issue 14): every bad request gets its 4xx, none a
5xx, and /health keeps answering in milliseconds, also under 64 streams at once.

    python bench/hostile.py                # the catalogue, then a 60 s mixed soak
    python bench/hostile.py --soak 600     # the 10-minute soak (64 streams + hostile traffic)
    python bench/hostile.py --soak 0       # the catalogue only
    python bench/hostile.py --no-hostile   # the soak's baseline: the 64 streams alone

Processes as in bench/proxy.py: the fast fake vLLM, the proxy (`dsml-proxy serve`, default
settings), this process as the clients. The catalogue sends each case of the issue once, with
/health probed every 20 ms beside it (latency of the probes while the case ran). The soak runs
64 checked tool-call streams back to back, one client cycling through the catalogue's cheap
cases, and the /health probe, sampling the proxy's RSS. Writes bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _fake_engine
import aiohttp
from _clients import check_chat, stream_one
from _procs import REPO, ProxyProcess, rss_bytes

RESULTS = REPO / "bench" / "results"
JSON = {"Content-Type": "application/json"}
USER = [{"role": "user", "content": "hi"}]


def _tool(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params}}


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def catalogue() -> list[tuple[str, str, bytes, dict[str, str], set[int]]]:
    """(name, path, body, headers, the statuses that are right)."""
    chat = {"model": "deepseek-chat", "messages": USER}
    schema = {"type": "object", "properties": {
        f"p{k}": {"type": "string", "description": "a parameter " * 8} for k in range(12)}}
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(450):
        node["properties"] = {"x": {}}
        node = node["properties"]["x"]
    cases: list[tuple[str, str, Any, set[int]]] = [
        ("pattern with a backreference", "/v1/chat/completions",
         {**chat, "tools": [_tool("f", {"properties": {"s": {"pattern": "(a)\\1"}}})]}, {400}),
        ("pattern with lookahead", "/v1/chat/completions",
         {**chat, "tools": [_tool("f", {"patternProperties": {"(?=a)": {}}})]}, {400}),
        ("catastrophic pattern (kept: RE2)", "/v1/chat/completions",
         {**chat, "tools": [_tool("f", {"properties": {"s": {"pattern": "^(a+)+$"}}})]}, {200}),
        ("1,024 tools", "/v1/chat/completions",
         {**chat, "tools": [_tool(f"t{n}", schema) for n in range(1024)]}, {200}),
        ("1,025 tools", "/v1/chat/completions",
         {**chat, "tools": [_tool(f"t{n}", {}) for n in range(1025)]}, {400}),
        ("100,000 tools", "/v1/chat/completions",
         {**chat, "tools": [_tool(f"t{n}", {}) for n in range(100_000)]}, {400}),
        ("3 MB of user text", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "lorem ipsum " * 250_000}]}, {200}),
        ("30 MB of user text", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "x" * 30_000_000}]}, {413}),
        ("20,000 messages", "/v1/chat/completions", {**chat, "messages": USER * 20_000}, {400}),
        ("tool parameters 450 deep", "/v1/chat/completions",
         {**chat, "tools": [_tool("f", deep)]}, {400}),
        ("malformed allowed_tools", "/v1/chat/completions",
         {**chat, "tools": [_tool("f", {})], "tool_choice": {
             "type": "allowed_tools", "allowed_tools": {"tools": [{"function": "f"}]}}}, {400}),
        ("malformed allowed_tools (Responses)", "/v1/responses",
         {"model": "deepseek-chat", "input": "hi",
          "tools": [{"type": "function", "name": "f", "parameters": {}}],
          "tool_choice": {"type": "allowed_tools", "tools": [{"name": ["f"]}]}}, {400}),
    ]
    for path, body in (("/v1/chat/completions", {**chat, "messages": [
            {"role": "user", "content": "a\ud800b"}]}),
            ("/v1/completions", {"model": "deepseek-chat", "prompt": "a\ud800b"}),
            ("/v1/responses", {"model": "deepseek-chat", "input": "a\ud800b"}),
            ("/v1/messages", {"model": "deepseek-chat", "max_tokens": 8, "messages": [
                {"role": "user", "content": "a\ud800b"}]}),
            ("/v1/messages/count_tokens", {"model": "deepseek-chat", "messages": [
                {"role": "user", "content": "a\ud800b"}]})):
        cases.append((f"lone surrogate {path}", path, body, {400}))
    out = [(name, path, json.dumps(body).encode(), JSON, ok) for name, path, body, ok in cases]
    raw = [
        ("JSON 2,500 deep", '{"model": "m", "messages": ' + _nested(2500) + "}", {400}),
        ("a 5,000-digit integer", '{"model": "m", "messages": [], "n": ' + "9" * 5000 + "}",
         {400}),
    ]
    out += [(name, "/v1/chat/completions", body.encode(), JSON, ok) for name, body, ok in raw]
    out.append(("form-encoded body", "/v1/chat/completions", json.dumps(chat).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"}, {415}))
    return out


async def probe(session: aiohttp.ClientSession, url: str, out: list[float],
                stop: asyncio.Event, every_s: float = 0.02) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        async with session.get(url + "/health") as resp:
            await resp.read()
        out.append(time.perf_counter() - start)
        await asyncio.sleep(every_s)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


async def run_catalogue(url: str) -> list[dict[str, Any]]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for name, path, body, headers, ok in catalogue():
            health: list[float] = []
            stop = asyncio.Event()
            prober = asyncio.create_task(probe(session, url, health, stop))
            start = time.perf_counter()
            async with session.post(url + path, data=body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
            elapsed = time.perf_counter() - start
            stop.set()
            await prober
            rows.append({"case": name, "status": status, "expected": sorted(ok),
                         "ok": status in ok, "ms": round(elapsed * 1000, 1),
                         "body_mb": round(len(body) / 1e6, 2),
                         "health_probes": len(health),
                         "health_max_ms": round(max(health, default=0) * 1000, 1),
                         "error": None if status == 200 else text[:160]})
            print(f"{name:40s} {status} {'ok ' if status in ok else 'BAD'} "
                  f"{elapsed * 1000:8.1f} ms  /health max {rows[-1]['health_max_ms']} ms "
                  f"({len(health)} probes)")
    return rows


async def mixed_soak(url: str, pid: int, seconds: float, cases: list[dict[str, Any]],
                     streams: int = 64, with_hostile: bool = True) -> dict[str, Any]:
    payloads = [json.dumps({
        "model": "deepseek-reasoner" if case["thinking"] else "deepseek-chat",
        "messages": [{"role": "user", "content": f"Soak request {i}: use a tool."}],
        "tools": case["tools"], "stream": True, "seed": i}).encode()
        for i, case in enumerate(cases)]
    cheap = [c for c in catalogue() if len(c[2]) < 200_000]
    counts = {"streams": 0, "stream_failures": 0, "hostile": 0, "hostile_wrong_status": 0,
              "server_errors_5xx": 0}
    health: list[float] = []
    samples: list[tuple[float, float]] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        samples.append((0.0, rss_bytes(pid) / 2**20))

        async def streamer(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                case = i % len(payloads)
                try:
                    s = await stream_one(session, url + "/v1/chat/completions", case,
                                         payloads[case])
                    failed = check_chat(s.body, cases[case]["expected"]) is not None
                except RuntimeError as exc:
                    failed = True
                    if "HTTP 5" in str(exc):
                        counts["server_errors_5xx"] += 1
                counts["streams"] += 1
                counts["stream_failures"] += failed
                i += streams

        async def hostile() -> None:
            k = 0
            while with_hostile and time.perf_counter() < deadline:
                _, path, body, headers, ok = cheap[k % len(cheap)]
                async with session.post(url + path, data=body, headers=headers) as resp:
                    await resp.read()
                    counts["hostile"] += 1
                    counts["hostile_wrong_status"] += resp.status not in ok
                    counts["server_errors_5xx"] += resp.status >= 500
                k += 1

        async def sampler() -> None:
            step = max(1.0, seconds / 12)
            while time.perf_counter() + step < deadline:
                await asyncio.sleep(step)
                samples.append((time.perf_counter() - start, rss_bytes(pid) / 2**20))

        stop = asyncio.Event()
        prober = asyncio.create_task(probe(session, url, health, stop, every_s=0.05))
        await asyncio.gather(sampler(), hostile(), *(streamer(k) for k in range(streams)))
        stop.set()
        await prober
        samples.append((time.perf_counter() - start, rss_bytes(pid) / 2**20))
    half = len(samples) // 2
    return {"seconds": seconds, "concurrent_streams": streams, "with_hostile": with_hostile,
            **counts,
            "health_probes": len(health), "health_p50_ms": round(pct(health, 0.5) * 1000, 1),
            "health_p99_ms": round(pct(health, 0.99) * 1000, 1),
            "health_max_ms": round(max(health, default=0) * 1000, 1),
            "rss_mb_samples": [[round(t, 1), round(m, 1)] for t, m in samples],
            "rss_growth_mb": round(samples[-1][1] - samples[0][1], 1),
            "rss_growth_second_half_mb": round(samples[-1][1] - samples[half][1], 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soak", type=float, default=60, metavar="SECONDS",
                    help="the mixed soak's length (default 60; 0: none)")
    ap.add_argument("--no-hostile", action="store_true",
                    help="the soak without the hostile client (the baseline of its figures)")
    ap.add_argument("--out", type=Path, default=RESULTS / "hostile.json")
    args = ap.parse_args(argv)
    cases = _fake_engine.load_cases(None)
    engine = _fake_engine.Engine(None)
    proxy = ProxyProcess(engine.url)
    try:
        proxy.wait_ready()
        report: dict[str, Any] = {
            "benchmark": "hostile",
            "command": "python bench/hostile.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "catalogue": asyncio.run(run_catalogue(proxy.url)),
        }
        if args.soak > 0:
            report["soak"] = asyncio.run(mixed_soak(proxy.url, proxy.pid, args.soak, cases,
                                                    with_hostile=not args.no_hostile))
            print(json.dumps({k: v for k, v in report["soak"].items()
                              if k != "rss_mb_samples"}, indent=1))
    finally:
        proxy.stop()
        engine.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    bad = [r["case"] for r in report["catalogue"] if not r["ok"]]
    print(f"\nwrote {args.out}; cases with a wrong status: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
