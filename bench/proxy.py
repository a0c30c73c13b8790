"""Proxy throughput, CPU and latency: the real server between aiohttp clients and a fast engine.

    python bench/proxy.py                 # ~2 min: prints the table, writes bench/results/proxy.json
    python bench/proxy.py --quick         # a shorter run (development)
    python bench/proxy.py --soak 120      # 64 streams for 120 s: the proxy's memory over time
                                          # (writes bench/results/proxy_soak.json)
    python bench/proxy.py --profile FILE  # the proxy under cProfile (CPU clock): top functions
    python bench/proxy.py --out PATH      # the JSON elsewhere

Three processes, all on 127.0.0.1, so that each one's CPU time is its own:

- a fake vLLM (bench/_fake_engine.py) streaming the tool-call completions of
  tests/data/dsml/parse.jsonl, one SSE event per token, pre-encoded, as fast as it can;
- the proxy, `dsml-proxy serve --upstream URL --upstream-kind vllm` (default settings);
- this process: plain aiohttp clients sending chat requests with the case's tools (so every
  chunk is relayed, parsed by the DSML parser and re-encoded as a chat-completion chunk).

In the same run, the same clients read the engine directly (the baseline: what the engine and
the client cost without the proxy) and through a bare aiohttp relay (bench/_relay.py, the
floor of any Python relay). Measured: chunks/s for 1 stream and for 64 concurrent streams,
the proxy's CPU time per chunk (/proc/<pid>/stat before and after a phase), time to first
chunk through the proxy minus straight to the engine (interleaved pairs), and every streamed
answer's tool calls against the corpus' expected ones.

Two chunk counts, because the proxy does not relay one for one: engine chunks are the
engine's SSE events (one per token; comparable across direct, proxy and relay), chunks out
are what the client gets (through the proxy, chat-completion chunks: the parser merges the
tokens of a tag or of a parameter value, about four engine chunks per chat chunk here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# This file's folder is first on sys.path (python bench/proxy.py): the helpers import as
# top-level modules. Nothing in this process imports the `proxy` package (this file's name
# would shadow it); the proxy runs in its own process.
import _fake_engine
import _relay
import aiohttp
from _clients import Phase, check_chat, check_completion, count_events, run_phase, stream_one
from _procs import REPO, ProxyProcess, cpu_seconds, cpu_times, rss_bytes
from _proxy_report import print_profile, soak_table, table, verdicts

RESULTS = REPO / "bench" / "results"

@dataclass
class Config:
    name: str
    phase_s: float  # each throughput phase runs this long
    min_requests: int  # ... and at least this many requests
    ttfc_pairs: int
    concurrency: int = 64
    case_limit: int | None = None
    relay: bool = True


CONFIGS = {
    "full": Config("full", phase_s=6.0, min_requests=64, ttfc_pairs=200),
    "quick": Config("quick", phase_s=1.5, min_requests=64, ttfc_pairs=50),
    # The smoke test's: seconds, not a measurement.
    "tiny": Config("tiny", phase_s=0.2, min_requests=8, ttfc_pairs=5, concurrency=4,
                   case_limit=12, relay=False),
}


# -- requests ----------------------------------------------------------------------------------


def chat_payloads(cases: list[dict[str, Any]]) -> list[bytes]:
    """One streamed chat request per case: its tools, its thinking mode, `seed` = its index
    (the fake engine replays completion `seed`)."""
    out = []
    for i, case in enumerate(cases):
        out.append(json.dumps({
            "model": "deepseek-reasoner" if case["thinking"] else "deepseek-chat",
            "messages": [{"role": "user", "content": f"Benchmark request {i}: use a tool."}],
            "tools": case["tools"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": i,
        }).encode())
    return out


def completion_payloads(cases: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps({"model": "deepseek-v4", "prompt": [0], "stream": True, "seed": i,
                        "stream_options": {"include_usage": True},
                        "skip_special_tokens": False}).encode()
            for i in range(len(cases))]


# -- phases ------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    payloads: list[bytes]
    pid: int | None  # the server whose CPU this phase charges (None: the direct baseline)


async def timed_phase(session: aiohttp.ClientSession, target: Target, engine: dict[str, Any],
                      cfg: Config, concurrency: int) -> tuple[Phase, dict[str, Any]]:
    """One throughput phase. Two chunk counts: the engine's events a stream consumed (one per
    token: comparable across direct, proxy and relay) and the SSE chunks the client got (for
    the proxy, chat-completion chunks: the parser merges tokens inside a tag or a parameter
    value, so there are fewer of them than tokens)."""
    pid, engine_pid = target.pid, engine["pid"]
    cpu0 = cpu_times(pid) if pid else (0.0, 0.0)
    eng0 = cpu_seconds(engine_pid)
    phase = await run_phase(session, target.url, target.payloads, concurrency=concurrency,
                            duration_s=cfg.phase_s, min_requests=cfg.min_requests)
    eng = cpu_seconds(engine_pid) - eng0
    tokens = sum(engine["events"][s.case] for s in phase.streams)
    row: dict[str, Any] = {
        "requests": len(phase.streams),
        "wall_s": round(phase.wall_s, 3),
        "engine_chunks": tokens,
        "engine_chunks_per_s": round(tokens / phase.wall_s),
        "chunks_out": phase.chunks,
        "chunks_out_per_s": round(phase.chunks_per_s),
        "in_stream_chunks_out_per_s": round(phase.in_stream_chunks_per_s),
        "in_stream_engine_chunks_per_s": round(tokens / phase.busy_s) if phase.busy_s else 0,
        "engine_cpu_us_per_engine_chunk": round(eng / tokens * 1e6, 2),
    }
    if pid:
        user, system = (t1 - t0 for t1, t0 in zip(cpu_times(pid), cpu0, strict=True))
        cpu = user + system
        row.update({
            "server_cpu_user_s": round(user, 3),
            "server_cpu_sys_s": round(system, 3),
            "server_cpu_utilisation": round(cpu / phase.wall_s, 3),
            "server_cpu_us_per_engine_chunk": round(cpu / tokens * 1e6, 2),
            "server_cpu_us_per_chunk_out": round(cpu / phase.chunks * 1e6, 2),
            "server_cpu_ms_per_1000_chunks_out": round(cpu / phase.chunks * 1e3, 3),
            "server_cpu_ms_per_request": round(cpu / len(phase.streams) * 1e3, 3),
        })
    return phase, row


def verify(phase: Phase, cases: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """Every stream's answer checked: chat streams against the case's expected tool calls."""
    failed, examples = 0, {}
    for s in phase.streams:
        case = cases[s.case]
        problem = check_chat(s.body, case["expected"]) if chat else check_completion(s.body)
        if problem:
            failed += 1
            if len(examples) < 5:
                examples.setdefault(case["id"], problem)
    return {"streams": len(phase.streams), "failed": failed, "examples": examples}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def ttfc_pairs(session: aiohttp.ClientSession, direct: Target, proxy: Target,
                     n: int) -> dict[str, Any]:
    """Time to first chunk at concurrency 1: direct and proxied requests of the same case,
    back to back, alternating which goes first (the machine's noise hits both alike)."""
    d_ms, p_ms = [], []
    for i in range(n):
        case = i % len(direct.payloads)
        order = [direct, proxy] if i % 2 == 0 else [proxy, direct]
        got = {}
        for target in order:
            s = await stream_one(session, target.url, case, target.payloads[case])
            got[target.name] = s.ttfc * 1e3
        d_ms.append(got[direct.name])
        p_ms.append(got[proxy.name])
    added = [p - d for p, d in zip(p_ms, d_ms, strict=True)]
    return {
        "pairs": n,
        "direct_ms": {"p50": round(pct(d_ms, 50), 3), "p99": round(pct(d_ms, 99), 3)},
        "proxy_ms": {"p50": round(pct(p_ms, 50), 3), "p99": round(pct(p_ms, 99), 3)},
        "added_ms": {"p50": round(pct(added, 50), 3), "p99": round(pct(added, 99), 3),
                     "p50_of_proxy_minus_p50_of_direct":
                         round(pct(p_ms, 50) - pct(d_ms, 50), 3)},
    }


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The proxy's own `dsml_proxy_*` samples, as {name with labels: value}."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("dsml_proxy_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def own_view(before: dict[str, float], after: dict[str, float], n: int,
             cpu_s: float) -> dict[str, float]:
    """What the proxy itself measured over the TTFC phase (its metrics, api.md), per request:
    middleware start to the engine's first token, its overhead (wall time minus the waits on
    the engine and the client: its own work, and time spent preempted), and its CPU time."""
    def mean_ms(metric: str) -> float:
        s, c = (f'{metric}_{k}{{endpoint="chat_completions"}}' for k in ("sum", "count"))
        count = after.get(c, 0) - before.get(c, 0)
        return round((after.get(s, 0) - before.get(s, 0)) / count * 1e3, 3) if count else 0.0

    return {"time_to_first_token_mean_ms": mean_ms("dsml_proxy_time_to_first_token_seconds"),
            "overhead_mean_ms": mean_ms("dsml_proxy_overhead_seconds"),
            "cpu_per_request_ms": round(cpu_s / n * 1e3, 3)}


async def warm_up(session: aiohttp.ClientSession, proxy: Target,
                  cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Every case once through the proxy, untimed: warms its caches, checks every answer."""
    phase = await run_phase(session, proxy.url, proxy.payloads, concurrency=4, duration_s=0,
                            min_requests=len(cases))
    return verify(phase, cases, chat=True)


# -- the run -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "note": "shared with other engineers' jobs: figures are noisy; compare within a run"}


async def benchmark(cfg: Config, engine: dict[str, Any], proxy_proc: ProxyProcess,
                    relay: dict[str, Any] | None, cases: list[dict[str, Any]]) -> dict[str, Any]:
    chat = chat_payloads(cases)
    direct = Target("direct", engine["url"] + "/v1/completions", completion_payloads(cases), None)
    proxy = Target("proxy", proxy_proc.url + "/v1/chat/completions", chat, proxy_proc.pid)
    targets = [direct, proxy]
    if relay:
        targets.append(Target("relay", relay["url"] + "/v1/chat/completions", chat, relay["pid"]))
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        out["warmup_check"] = await warm_up(session, proxy, cases)
        # Warm the direct path and the relay too (connections, first-request costs).
        for t in targets:
            await run_phase(session, t.url, t.payloads, concurrency=cfg.concurrency,
                            duration_s=0, min_requests=cfg.concurrency)
        checks: dict[str, Any] = {}
        for label, concurrency in (("1_stream", 1), (f"{cfg.concurrency}_streams", cfg.concurrency)):
            out[label] = {}
            for t in targets:
                phase, row = await timed_phase(session, t, engine, cfg, concurrency)
                out[label][t.name] = row
                if t.name != "relay":
                    checks[f"{label}/{t.name}"] = verify(phase, cases, chat=t is proxy)
                del phase
        before = await scrape(session, proxy_proc.url)
        cpu0 = cpu_seconds(proxy_proc.pid)
        out["ttfc"] = await ttfc_pairs(session, direct, proxy, cfg.ttfc_pairs)
        cpu = cpu_seconds(proxy_proc.pid) - cpu0
        out["ttfc"]["proxy_own_view"] = own_view(before, await scrape(session, proxy_proc.url),
                                                 cfg.ttfc_pairs, cpu)
        out["checks"] = checks
    out["load_after"] = os.getloadavg()
    out["proxy_rss_mb_after"] = round(rss_bytes(proxy_proc.pid) / 2**20, 1)
    return out


async def soak(seconds: float, cfg: Config, engine: dict[str, Any], proxy_proc: ProxyProcess,
               cases: list[dict[str, Any]]) -> dict[str, Any]:
    """64 streams back to back for `seconds`, the proxy's VmRSS sampled ~12 times. Each answer
    is checked as it completes and dropped (nothing accumulates in this process either).

    The reasoning cache (default 4,096 call ids, LRU) legitimately grows until it is full:
    `reasoning_cache_puts` counts what this run put in it, so a rise while it fills can be
    told from a leak (growth after it is full)."""
    payloads = chat_payloads(cases)
    url = proxy_proc.url + "/v1/chat/completions"
    pid = proxy_proc.pid
    samples: list[tuple[float, int]] = []
    counts = {"requests": 0, "failed": 0, "reasoning_cache_puts": 0}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        warm = await warm_up(session, Target("proxy", url, payloads, pid), cases)
        start = time.perf_counter()
        deadline = start + seconds
        samples.append((0.0, rss_bytes(pid)))
        cpu0 = cpu_seconds(pid)
        chunks = tokens = 0

        async def worker(k: int) -> None:
            nonlocal chunks, tokens
            i = k
            while time.perf_counter() < deadline:
                case = i % len(payloads)
                s = await stream_one(session, url, case, payloads[case])
                counts["requests"] += 1
                expected = cases[case]["expected"]
                if expected["reasoning_content"]:  # the proxy remembers it per call id
                    counts["reasoning_cache_puts"] += len(expected["tool_calls"])
                chunks += count_events(s.body)
                tokens += engine["events"][case]
                if check_chat(s.body, cases[case]["expected"]):
                    counts["failed"] += 1
                i += cfg.concurrency

        async def sampler() -> None:
            step = max(1.0, seconds / 12)
            while time.perf_counter() + step < deadline:
                await asyncio.sleep(step)
                samples.append((time.perf_counter() - start, rss_bytes(pid)))

        await asyncio.gather(sampler(), *(worker(k) for k in range(cfg.concurrency)))
        wall = time.perf_counter() - start
        samples.append((wall, rss_bytes(pid)))
        cpu = cpu_seconds(pid) - cpu0
    mb = [round(r / 2**20, 1) for _, r in samples]
    half = len(samples) // 2
    return {
        "seconds": seconds, "streams": cfg.concurrency, "warmup_check": warm, **counts,
        "engine_chunks_per_s": round(tokens / wall), "chunks_out_per_s": round(chunks / wall),
        "proxy_cpu_us_per_engine_chunk": round(cpu / tokens * 1e6, 2),
        "rss_mb_samples": [[round(t, 1), m] for (t, _), m in zip(samples, mb, strict=True)],
        "rss_mb_start": mb[0], "rss_mb_end": mb[-1], "rss_mb_max": max(mb),
        "rss_growth_mb": round(mb[-1] - mb[0], 1),
        "rss_growth_second_half_mb": round(mb[-1] - mb[half], 1),
    }


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases (development)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="only the soak: 64 streams for SECONDS, the proxy's RSS over time")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results/proxy.json, "
                    "proxy_soak.json with --soak)")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="run the proxy under cProfile, write its stats to FILE, print the top")
    args = ap.parse_args(argv)
    cfg = CONFIGS["tiny" if args.tiny else "quick" if args.quick else "full"]
    out_path = args.out or RESULTS / ("proxy_soak.json" if args.soak else "proxy.json")

    cases = _fake_engine.load_cases(cfg.case_limit)
    # The engine listens at once and encodes its corpus while the proxy starts up.
    engine_proc = _fake_engine.Engine(cfg.case_limit)
    proxy_proc = ProxyProcess(engine_proc.url, profile=args.profile)
    relay_proc, relay = (_relay.start(engine_proc.url) if cfg.relay and not args.soak
                         else (None, None))
    try:
        engine = {"url": engine_proc.url, "pid": engine_proc.pid, "events": engine_proc.events()}
        proxy_proc.wait_ready()
        report: dict[str, Any] = {
            "benchmark": "proxy",
            "command": "python bench/proxy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": cfg.__dict__,
            "machine": machine(),
            "proxy_command": "dsml-proxy " + " ".join(proxy_proc.args),
            "corpus": {"file": "tests/data/dsml/parse.jsonl (cases with tool calls)",
                       "cases": len(cases),
                       "chunks_per_completion_mean": round(statistics.mean(engine["events"]), 1)},
        }
        if args.soak:
            report["soak"] = asyncio.run(soak(args.soak, cfg, engine, proxy_proc, cases))
            print(soak_table(report["soak"]))
        else:
            res = asyncio.run(benchmark(cfg, engine, proxy_proc, relay, cases))
            res["targets"] = verdicts(res, cfg.concurrency)
            report.update(res)
            print(table(res, cfg.concurrency))
    finally:
        proxy_proc.stop()
        if relay_proc is not None:
            relay_proc.terminate()
            relay_proc.join(5)
        engine_proc.stop()
    if args.profile:
        report["profile"] = str(args.profile)
        print(print_profile(args.profile))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
