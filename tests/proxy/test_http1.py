"""The upstream HTTP/1.1 client on its own: framing, reuse, failures, against raw servers on
127.0.0.1 that write exactly the bytes a test gives them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backends.http1 import ConnectionLost, Http1Client, HttpError, Response, _Connection

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_raw(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


async def body_of(resp: Response) -> bytes:
    parts = []
    while data := await resp.read_some():
        parts.append(data)
    return b"".join(parts)


async def get_ok(client: Http1Client, times: int, pause_s: float = 0.0) -> None:
    """`times` GET requests, each answered `ok`."""
    for _ in range(times):
        resp = await client.request("GET", "/")
        assert await resp.read() == b"ok"
        resp.release()
        await asyncio.sleep(pause_s)


def response_for(headers: dict[str, str]) -> tuple[Response, _Connection]:
    conn = _Connection(set())
    client = Http1Client("http://127.0.0.1:1")
    return Response(client, conn, 200, headers, 1.0), conn


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    extension=st.sampled_from([b"", b";name=value", b" ; x"]),
    trailer=st.sampled_from([b"", b"X-Usage: 1\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_chunked_bodies_cut_anywhere(pieces: list[bytes], extension: bytes, trailer: bytes,
                                     cuts: list[int]) -> None:  # fmt: skip
    """However the reads split the wire bytes, the body comes out whole and the read stops
    exactly at its end (what follows belongs to the next response)."""
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces)
    wire += b"0" + extension + b"\r\n" + trailer + b"\r\nNEXT"
    resp, conn = response_for({"transfer-encoding": "chunked"})
    got = []
    bounds = sorted({min(c, len(wire)) for c in cuts} | {len(wire)})
    start = 0
    for end in bounds:
        conn.data_received(wire[start:end])
        start = end
        got.append(resp._take())
    assert b"".join(got) == b"".join(pieces)
    assert resp.at_eof
    assert bytes(conn.buf) == b"NEXT"


@pytest.mark.parametrize("bad", [b"zz\r\nab\r\n", b"2\r\nabc\r\n", b"-1\r\n", b"9" * 5000])
def test_broken_chunked_encoding_is_an_error(bad: bytes) -> None:
    resp, conn = response_for({"transfer-encoding": "chunked"})
    conn.data_received(bad)
    with pytest.raises(HttpError):
        resp._take()


async def test_sized_and_close_delimited_bodies_keep_alive_only_when_framed() -> None:
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"wor", b"ld"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n1.",  # HTTP/1.0: closed after it
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",  # no framing: the body ends with the connection
    ]
    connections = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while replies:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:  # the client closed it
                return
            reply = replies.pop(0)
            writer.write(reply)
            if b"Content-Length" not in reply and b"chunked" not in reply:
                writer.close()
                return

    server, url = await serve_raw(handler)
    client = Http1Client(url)
    try:
        for expected in (b"hello", b"world", b"1.", b"until the end"):
            resp = await client.request("GET", "/")
            assert await body_of(resp) == expected
            resp.release()
        # The framed HTTP/1.1 bodies left their connection for reuse; the HTTP/1.0 answer
        # did not, though this server would have kept it open.
        assert len(connections) == 2 and client.connections_opened == 2
    finally:
        await client.close()
        server.close()


async def test_request_line_host_prefix_and_body() -> None:
    seen = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"  # interim responses are skipped
                     b"HTTP/1.1 201 Created\r\nX-A: 1\r\nX-A: 2\r\nContent-Length: 0\r\n\r\n")

    server, url = await serve_raw(handler)
    client = Http1Client(url + "/engine/")
    try:
        resp = await client.request("POST", "/v1/completions", b'{"a":1}',
                                    content_type="application/json")
        assert resp.status == 201 and resp.headers["x-a"] == "1, 2" and resp.at_eof
        resp.release()
    finally:
        await client.close()
        server.close()
    line, headers, body = seen[0]
    assert line == "POST /engine/v1/completions HTTP/1.1"
    assert headers["host"] == url.removeprefix("http://")
    assert headers["content-type"] == "application/json" and body == b'{"a":1}'


def test_host_headers_and_bad_urls() -> None:
    assert Http1Client("http://[::1]:8080/x")._host_header == "[::1]:8080"
    assert Http1Client("https://engine.example")._host_header == "engine.example"
    assert Http1Client("http://engine.example:80")._host_header == "engine.example"
    for bad in ("ftp://h", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError):
            Http1Client(bad)


async def test_a_reused_connection_the_engine_closed_is_replaced() -> None:
    """An engine may close an idle keep-alive connection at any time: the next request
    goes out again on a new connection, once, and the caller never sees it."""
    served = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive was promised, but the engine closes it anyway

    server, url = await serve_raw(handler)
    client = Http1Client(url)
    try:
        await get_ok(client, 3, pause_s=0.01)
        assert len(served) == 3 and client.connections_opened == 3
    finally:
        await client.close()
        server.close()


async def test_a_request_lost_on_a_reused_connection_goes_out_again() -> None:
    """The engine closes a kept-alive connection just as the next request arrives on it (no
    byte of an answer): that request is sent again on a new connection. On a new connection
    the same loss is the caller's error: nothing is sent twice there."""
    per_connection = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_connection.append(0)
        me = len(per_connection) - 1
        while True:
            line, _, _ = await read_request(reader)
            per_connection[me] += 1
            if per_connection[me] == 2 or line.startswith("GET /never"):
                writer.close()  # read, never answered
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server, url = await serve_raw(handler)
    client = Http1Client(url)
    try:
        await get_ok(client, 2)
        assert per_connection == [2, 1]  # the second request went out twice
        with pytest.raises(ConnectionLost):
            await client.request("GET", "/never")  # a fresh connection: no second try
    finally:
        await client.close()
        server.close()


@pytest.mark.parametrize(("reply", "error"), [
    (b"SPDY/3 200 OK\r\n\r\n", HttpError),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", HttpError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", HttpError),
    (b"HTTP/1.1 200", ConnectionLost),  # closed inside the status line
])
async def test_broken_answers(reply: bytes, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server, url = await serve_raw(handler)
    client = Http1Client(url)
    try:
        with pytest.raises(error):
            await client.request("GET", "/")
    finally:
        await client.close()
        server.close()


async def test_a_body_cut_short_and_a_silent_engine() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if line.startswith("GET /short"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
            writer.close()
        else:  # headers, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            await asyncio.sleep(5)

    server, url = await serve_raw(handler)
    client = Http1Client(url, read_timeout_s=0.2)
    try:
        resp = await client.request("GET", "/short")
        assert await resp.read_some() == b"abc"
        with pytest.raises(ConnectionLost):
            await resp.read_some()
        resp.close()
        resp = await client.request("GET", "/silent")
        with pytest.raises(TimeoutError):
            await resp.read_some()
        resp.close()
    finally:
        await client.close()
        server.close()


async def test_nothing_listening_is_an_os_error() -> None:
    from tests.fakes.upstream import refused_url

    client = Http1Client(refused_url())
    with pytest.raises(OSError):
        await client.request("GET", "/")
    await client.close()
