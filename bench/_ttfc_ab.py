"""Time to first chunk of two proxies side by side, against one fake engine, interleaved.

    python bench/_ttfc_ab.py --before DIR [--rounds 400] [--relay] [--direct-prompt]

`--before DIR` is a frozen copy of an older proxy: a folder holding its `proxy`, `dsml` and
`schemas` packages (`mkdir DIR && cp -r dsml proxy schemas DIR`); `--after DIR` likewise
(default: this working tree). Each proxy runs with default settings (`dsml-proxy serve
--upstream URL --upstream-kind vllm`) in its own process, in front of the same fake engine
(bench/_fake_engine.py). After one untimed round per case (the caches warm, as in
bench/proxy.py), each round sends one case straight to the engine ("direct", the
`prompt: [0]` request of bench/proxy.py) and through every proxy, in an order that rotates
from round to round, back to back (`--gap-ms` to wait between requests), and keeps each
proxied time minus that round's direct one. Every proxied answer is checked.

`bench/proxy.py` runs two versions minutes apart, so the machine's load (shared, 2 cores)
differs between them by more than the effect measured; here all see the same moments. With
three or more targets each server's caches are colder than with two, so absolute figures are
higher than bench/proxy.py's; compare within a run.

Also reported: the added time p50 by how many tokens the case's first chunk needs (one, or
~15-18 for a turn that opens with a tool call's name: those wait for the engine's second
write), each proxy's CPU per request (whole streams), `--relay` (bench/_relay.py, the bare
aiohttp relay: the floor of any Python relay here) and `--direct-prompt` (straight to the
engine with the prompt ids the proxy sends, to see what the real prompt costs the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import _fake_engine
import _relay
import aiohttp
from _clients import check_chat, stream_one
from _procs import ProxyProcess, cpu_seconds

from proxy import chat_payloads, completion_payloads, pct  # bench/proxy.py (this folder)


async def run(urls: dict[str, str], payloads: dict[str, list[bytes]], cases: list[dict],
              rounds: int, gap_s: float, warm: int,
              raw_out: Path | None = None) -> dict[str, list[float]]:
    names = list(urls)
    ttfc: dict[str, list[float]] = {n: [] for n in names}
    raw: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(warm + rounds):
            case = i % len(cases)
            k = i % len(names)
            order = names[k:] + names[:k]
            for name in order:
                s = await stream_one(session, urls[name], case, payloads[name][case])
                if name not in ("direct", "direct+prompt", "relay") and (
                        problem := check_chat(s.body, cases[case]["expected"])):
                    raise RuntimeError(f"{name}, case {case}: {problem}")
                raw[name].append((s.started, s.first_at))
                if i >= warm:
                    ttfc[name].append(s.ttfc * 1e3)
                if gap_s:
                    await asyncio.sleep(gap_s)
    if raw_out:
        raw_out.write_text(json.dumps(raw))
    return ttfc


def first_event_tokens(cases: list[dict]) -> list[int]:
    """How many of its tokens each case's first chunk needs: the DSML parser's first event
    (1 for reasoning or content, ~15-18 for a turn that opens with a tool call's name)."""
    from dsml.parser import StreamParser

    out = []
    for case in cases:
        stream = _fake_engine.encode_stream(case["completion"])
        texts = [json.loads(e[6:])["choices"][0]["text"]
                 for e in (stream.head + stream.rest).split(b"\n\n") if e.startswith(b"data: ")]
        parser = StreamParser(tools=case["tools"], thinking=case["thinking"])
        n = next((k + 1 for k, text in enumerate(texts)
                  if any(type(e).__name__ != "Notice" for e in parser.feed(text))), len(texts))
        out.append(n)
    return out


def prompt_payloads(cases: list[dict], chat: list[bytes]) -> list[bytes]:
    """Completion requests carrying the prompt ids the proxy renders for each chat request
    (as it sends them to a vLLM upstream), instead of bench/proxy.py's `[0]`."""
    from dsml.request import render_chat
    from dsml.tokenizer import load_tokenizer

    tok = load_tokenizer()
    out = []
    for i, body in enumerate(chat):
        request = json.loads(body)
        prompt = render_chat(request, default_thinking=True)
        out.append(json.dumps({
            "model": "deepseek-v4", "prompt": tok.encode_prompt(prompt), "stream": True,
            "seed": i, "stream_options": {"include_usage": True},
            "skip_special_tokens": False, "spaces_between_special_tokens": False}).encode())
    return out


def summary(ttfc: dict[str, list[float]], needs: list[int]) -> dict[str, dict[str, float]]:
    """p50/p99, and the added time p50 also by how many tokens the first chunk needs (one,
    or more: mostly a tool call's name)."""
    direct = ttfc["direct"]
    out = {"direct": {"p50_ms": round(pct(direct, 50), 3), "p99_ms": round(pct(direct, 99), 3)}}
    for name, values in ttfc.items():
        if name == "direct":
            continue
        if name == "direct+prompt":
            added = [p - d for p, d in zip(values, direct, strict=True)]
            out[name] = {"p50_ms": round(pct(values, 50), 3),
                         "added_over_direct_p50_ms": round(pct(added, 50), 3)}
            continue
        added = [p - d for p, d in zip(values, direct, strict=True)]
        groups = {"1_token": [a for a, n in zip(added, needs, strict=True) if n == 1],
                  "more_tokens": [a for a, n in zip(added, needs, strict=True) if n > 1]}
        out[name] = {"p50_ms": round(pct(values, 50), 3), "p99_ms": round(pct(values, 99), 3),
                     "added_p50_ms": round(pct(added, 50), 3),
                     "added_p99_ms": round(pct(added, 99), 3),
                     "added_mean_ms": round(statistics.mean(added), 3),
                     **{f"added_p50_{group}_ms": round(pct(v, 50), 3)
                        for group, v in groups.items() if v}}
    if "before" in ttfc and "after" in ttfc:  # paired: the same case, the same round
        diff = [a - b for a, b in zip(ttfc["after"], ttfc["before"], strict=True)]
        out["after_minus_before"] = {"p50_ms": round(pct(diff, 50), 3),
                                     "mean_ms": round(statistics.mean(diff), 3)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="folder with a frozen proxy/dsml/schemas")
    ap.add_argument("--after", type=Path, default=None,
                    help="the tree 'after' runs from (default: this working tree)")
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--warm", type=int, default=None,
                    help="untimed rounds first (default: every case once, warming caches)")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="wait between requests (default 0: back to back, as bench/proxy.py)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--direct-prompt", action="store_true",
                    help="also 'direct+prompt': straight to the engine with the prompt ids the "
                         "proxy sends for the case (bench/proxy.py's direct requests carry [0])")
    ap.add_argument("--relay", action="store_true",
                    help="also bench/_relay.py, the bare relay: the floor of an aiohttp relay")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="run the 'after' proxy under cProfile (CPU clock), stats to FILE")
    ap.add_argument("--raw", type=Path, help="every request's (start, first chunk) times, "
                    "perf_counter (CLOCK_MONOTONIC: comparable with the servers' clocks)")
    args = ap.parse_args()

    cases = _fake_engine.load_cases()
    engine = _fake_engine.Engine()
    procs = {}
    relay_proc = None
    try:
        if args.before:
            procs["before"] = ProxyProcess(engine.url, cwd=args.before.resolve())
        procs["after"] = ProxyProcess(engine.url, profile=args.profile,
                                      **({"cwd": args.after.resolve()} if args.after else {}))
        engine.events()
        for p in procs.values():
            p.wait_ready()
        chat = chat_payloads(cases)
        urls = {"direct": engine.url + "/v1/completions",
                **{n: p.url + "/v1/chat/completions" for n, p in procs.items()}}
        payloads = {"direct": completion_payloads(cases), **{n: chat for n in procs}}
        if args.direct_prompt:
            urls["direct+prompt"] = engine.url + "/v1/completions"
            payloads["direct+prompt"] = prompt_payloads(cases, chat)
        if args.relay:
            relay_proc, relay = _relay.start(engine.url)
            urls["relay"], payloads["relay"] = relay["url"] + "/v1/chat/completions", chat
        needs = first_event_tokens(cases)
        load0 = os.getloadavg()
        t0 = time.time()
        warm = len(cases) if args.warm is None else args.warm
        cpu0 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        ttfc = asyncio.run(run(urls, payloads, cases, args.rounds, args.gap_ms / 1e3, warm,
                               args.raw))
        # Each proxy's CPU per request over the whole run (warm-up included): whole streams.
        cpu_ms = {n: round((cpu_seconds(p.pid) - cpu0[n]) / (warm + args.rounds) * 1e3, 3)
                  for n, p in procs.items()}
        res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
               "rounds": args.rounds, "gap_ms": args.gap_ms,
               "load_before": [round(x, 2) for x in load0],
               "load_after": [round(x, 2) for x in os.getloadavg()],
               **summary(ttfc, [needs[(warm + i) % len(cases)] for i in range(args.rounds)])}
        for name, ms in cpu_ms.items():
            res[name]["cpu_ms_per_request"] = ms
    finally:
        for p in procs.values():
            p.stop()
        if relay_proc is not None:
            relay_proc.terminate()
            relay_proc.join(5)
        engine.stop()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
