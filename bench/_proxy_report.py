"""Tables and verdicts for bench/proxy.py (the figures themselves are measured there)."""

from __future__ import annotations

import io
import pstats
from pathlib import Path
from typing import Any

# For scale (issue 3), measured on this kind of machine.
LITELLM_CHUNKS_PER_S = 1250
LITELLM_CPU_US_PER_CHUNK = 700
BARE_RELAY_CHUNKS_PER_S = 31000
BARE_RELAY_CPU_US_PER_CHUNK = 17
TARGET_CHUNKS_PER_S = 20000
TARGET_CPU_US_PER_CHUNK = 50
TARGET_ADDED_TTFC_P50_MS = 1.0



def verdicts(res: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    """Each target judged on its main reading, with the other readings beside it.

    Chunks per second "for one stream" is read as the rate inside a stream, first to last
    byte, in engine chunks (tokens): what a long generation sees, comparable one for one with
    LiteLLM and the bare relay. End to end (request setup included, ~175-token completions)
    and chat chunks out are given too. CPU per chunk is per engine chunk, 64 streams."""
    one = res["1_stream"]["proxy"]
    many = res[f"{concurrency}_streams"]["proxy"]
    rate = one["in_stream_engine_chunks_per_s"]
    cpu = many["server_cpu_us_per_engine_chunk"]
    added = res["ttfc"]["added_ms"]["p50"]
    return [
        {"target": f">= {TARGET_CHUNKS_PER_S:,} chunks/s for one stream (tokens relayed, "
                   "parsed, re-encoded)", "measured": rate, "met": rate >= TARGET_CHUNKS_PER_S,
         "also": {"end_to_end_engine_chunks_per_s": one["engine_chunks_per_s"],
                  "in_stream_chat_chunks_out_per_s": one["in_stream_chunks_out_per_s"],
                  "end_to_end_chat_chunks_out_per_s": one["chunks_out_per_s"]}},
        {"target": f">= 15x LiteLLM ({15 * LITELLM_CHUNKS_PER_S:,} chunks/s, one stream)",
         "measured": f"{rate / LITELLM_CHUNKS_PER_S:.1f}x",
         "met": rate >= 15 * LITELLM_CHUNKS_PER_S},
        {"target": f"<= {TARGET_CPU_US_PER_CHUNK} us proxy CPU per chunk ({concurrency} "
                   "streams, per engine chunk)", "measured": cpu,
         "met": cpu <= TARGET_CPU_US_PER_CHUNK,
         "also": {"per_chat_chunk_out_us": many["server_cpu_us_per_chunk_out"],
                  "one_stream_per_engine_chunk_us": one["server_cpu_us_per_engine_chunk"]}},
        {"target": f"< {TARGET_ADDED_TTFC_P50_MS} ms added time to first chunk, p50",
         "measured": added, "met": added < TARGET_ADDED_TTFC_P50_MS},
    ]


def table(res: dict[str, Any], concurrency: int) -> str:
    names = [n for n in ("direct", "proxy", "relay") if n in res["1_stream"]]
    heads = {"direct": "direct (engine)", "proxy": "dsml-proxy", "relay": "bare relay"}
    lines = []

    def row(label: str, values: list[Any]) -> None:
        cells = [f"{v:,}" if isinstance(v, int) else str(v) for v in values]
        lines.append(f"{label:<36}" + "".join(f"{c:>16}" for c in cells))

    def get(r: dict[str, Any], key: str) -> list[Any]:
        return [r[n].get(key, "-") for n in names]

    row("", [*(heads[n] for n in names), "proxy/direct"])
    for label in ("1_stream", f"{concurrency}_streams"):
        r = res[label]
        ratio = r["proxy"]["engine_chunks_per_s"] / r["direct"]["engine_chunks_per_s"]
        row(label.replace("_", " ") + ": engine chunks/s",
            [*get(r, "engine_chunks_per_s"), f"{ratio:.3f}"])
        row("  chunks out/s (proxy: chat chunks)", get(r, "chunks_out_per_s"))
        if label == "1_stream":  # with 64 streams interleaved, this measures fairness instead
            row("  per stream, first to last byte:", [])
            row("    engine chunks/s", get(r, "in_stream_engine_chunks_per_s"))
            row("    chunks out/s", get(r, "in_stream_chunks_out_per_s"))
        row("  server CPU us / engine chunk", get(r, "server_cpu_us_per_engine_chunk"))
        row("  server CPU us / chunk out", get(r, "server_cpu_us_per_chunk_out"))
        row("  server CPU ms / request", get(r, "server_cpu_ms_per_request"))
        row("  server CPU user / sys s", [
            f"{r[n]['server_cpu_user_s']} / {r[n]['server_cpu_sys_s']}" if n != "direct" else "-"
            for n in names])
        row("  engine CPU us / engine chunk", get(r, "engine_cpu_us_per_engine_chunk"))
    t = res["ttfc"]
    row("time to first chunk p50 / p99 ms",
        [f"{t['direct_ms']['p50']:.2f} / {t['direct_ms']['p99']:.2f}",
         f"{t['proxy_ms']['p50']:.2f} / {t['proxy_ms']['p99']:.2f}"])
    row("  added by the proxy p50 / p99 ms",
        ["", f"{t['added_ms']['p50']:.2f} / {t['added_ms']['p99']:.2f}"])
    own = t["proxy_own_view"]
    row("  proxy metrics: TTFT/overhead ms", ["", f"{own['time_to_first_token_mean_ms']:.2f} / "
                                              f"{own['overhead_mean_ms']:.2f}"])
    row("  proxy CPU ms per request (c=1)", ["", own["cpu_per_request_ms"]])
    lines.append("")
    for v in res["targets"]:
        lines.append(f"  [{'met' if v['met'] else 'NOT met'}] {v['target']}: {v['measured']}")
        if v.get("also"):
            lines.append("      also: " + ", ".join(f"{k} {x}" for k, x in v["also"].items()))
    lines.append("")
    lines.append(
        f"  For scale (issue 3): LiteLLM ~{LITELLM_CHUNKS_PER_S:,} chunks/s for one stream, "
        f"~{LITELLM_CPU_US_PER_CHUNK} us CPU/chunk; a bare aiohttp relay re-encoding each "
        f"chunk's JSON ~{BARE_RELAY_CHUNKS_PER_S:,} chunks/s, {BARE_RELAY_CPU_US_PER_CHUNK} us/chunk.")
    if "relay" in names:
        one, many = res["1_stream"]["relay"], res[f"{concurrency}_streams"]["relay"]
        lines.append(f"  This run's bare relay: {one['in_stream_engine_chunks_per_s']:,} chunks/s "
                     f"per stream, {many['server_cpu_us_per_engine_chunk']} us CPU/chunk "
                     "(user+sys): compare the proxy with it, not with the quoted figures.")
    lines.append("  direct = the same clients reading the fake engine; engine chunks = its SSE "
                 "events (one per token); chunks out through the proxy are chat-completion "
                 "chunks (role, content/reasoning/tool-call deltas, finish, usage).")
    return "\n".join(lines)


def soak_table(soak: dict[str, Any]) -> str:
    samples = "  ".join(f"{t:g}s:{mb}" for t, mb in soak["rss_mb_samples"])
    return "\n".join([
        f"soak: {soak['streams']} streams for {soak['seconds']:g} s, {soak['requests']:,} requests "
        f"({soak['failed']} with wrong tool calls), {soak['engine_chunks_per_s']:,} engine "
        f"chunks/s, proxy CPU {soak['proxy_cpu_us_per_engine_chunk']} us/engine chunk",
        f"proxy VmRSS MB: start {soak['rss_mb_start']}, end {soak['rss_mb_end']}, max "
        f"{soak['rss_mb_max']}, growth {soak['rss_growth_mb']} (second half "
        f"{soak['rss_growth_second_half_mb']})",
        f"samples (t:MB): {samples}",
        f"reasoning cache puts this run: {soak['reasoning_cache_puts']:,} (bounded at 4,096 ids)",
    ])


def print_profile(path: Path, top: int = 25) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()
