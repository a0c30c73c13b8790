"""The upstream HTTP client alone: aiohttp's ClientSession against proxy.backends.http1.

    python bench/_http_client.py [--requests 2000] [--rounds 3]

A minimal engine in a child process answers every POST with a three-event chunked SSE stream
at once. Each client sends a ~5 KB JSON body (about 900 prompt ids, as the proxy does),
reads the first body bytes (the time kept: what the proxy's first chunk waits for), then the
rest of the body, on one kept-alive connection. Reported: p50 time to the first body bytes
and client CPU per request (process time over the whole request), alternating clients round
by round so that both see the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EVENT = b'data: {"choices":[{"index":0,"text":"hi","finish_reason":null}]}\n\n'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Engine(asyncio.Protocol):
    """Reads requests with a Content-Length body; answers each with a chunked SSE stream."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"  # type: ignore[attr-defined]
                                 b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(EVENT))
            self.transport.write(_chunk(EVENT) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")  # type: ignore[attr-defined]


def _serve(port_out: mp.connection.Connection) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Engine, "127.0.0.1", 0)
        port_out.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


async def _measure(url: str, requests: int, rounds: int) -> dict[str, dict[str, float]]:
    import aiohttp
    from yarl import URL

    from proxy.backends.http1 import Http1Client

    body = json.dumps({"prompt": list(range(128000, 128900)), "stream": True}).encode()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    target = URL(url + "/v1/completions")
    headers = {"Content-Type": "application/json"}
    client = Http1Client(url)

    async def with_aiohttp() -> float:
        resp = await session.post(target, data=body, headers=headers)
        await resp.content.readany()
        first = time.perf_counter()
        await resp.read()
        resp.release()
        return first

    async def with_http1() -> float:
        resp = await client.request("POST", "/v1/completions", body,
                                    content_type="application/json")
        await resp.read_some()
        first = time.perf_counter()
        await resp.read()
        resp.release()
        return first

    clients = {"aiohttp ClientSession": with_aiohttp, "proxy.backends.http1": with_http1}
    times: dict[str, list[float]] = {name: [] for name in clients}
    cpu: dict[str, float] = dict.fromkeys(clients, 0.0)
    for _ in range(rounds):
        for name, one in clients.items():
            await one()  # warm: a connection in the pool
            cpu0 = time.process_time()
            for _ in range(requests):
                start = time.perf_counter()
                times[name].append(await one() - start)
            cpu[name] += time.process_time() - cpu0
    await session.close()
    await client.close()
    return {
        name: {"first_bytes_p50_ms": round(statistics.median(t) * 1e3, 3),
               "cpu_ms_per_request": round(cpu[name] / len(t) * 1e3, 3)}
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    here, there = mp.Pipe()
    engine = mp.Process(target=_serve, args=(there,), daemon=True)
    engine.start()
    try:
        url = f"http://127.0.0.1:{here.recv()}"
        results = asyncio.run(_measure(url, args.requests, args.rounds))
    finally:
        engine.terminate()
    print(f"{'client':24s} {'first bytes p50 ms':>19s} {'CPU ms / request':>17s}")
    for name, row in results.items():
        print(f"{name:24s} {row['first_bytes_p50_ms']:19.3f} {row['cpu_ms_per_request']:17.3f}")
    out = Path(__file__).resolve().parent / "results" / "http_client.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
