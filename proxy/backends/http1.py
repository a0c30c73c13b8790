"""A lean HTTP/1.1 client for the proxy's upstream engine: keep-alive connections, a
request written in one send, a response body read as it arrives.

Why not aiohttp's client (the proxy's server stays aiohttp): on the path to an engine's
first token, `ClientSession.post` and its response machinery (request and response objects,
cookie, header and trace handling, a StreamReader) cost ~0.30 ms of CPU per request on this
machine, against ~0.11 ms for this module, and the first body bytes come ~0.2 ms later
(`python bench/_http_client.py`). Issue 3 gives the whole proxy 1 ms.

What talking to one engine needs is small, and it is all here: `http` and `https` base URLs
(a path prefix kept), `Content-Length` request bodies, responses framed by chunked
transfer-encoding, `Content-Length` or the connection's end, interim 1xx responses skipped,
idle connections reused (a request that finds its reused connection closed by the engine
before any byte of an answer is sent again, once, on a new one), a timeout for connecting and
one for each wait for bytes. Nothing else: no redirects, cookies, proxies, compression
(none is asked for) or pipelining.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

_MAX_HEAD = 65536  # status line and headers
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_PAUSE_AT = 1 << 22  # unread bytes at which reading pauses until the consumer catches up
_CHUNKED, _SIZED, _UNTIL_CLOSE = range(3)
_DATA_END, _SIZE_LINE, _TRAILERS = -1, -2, -3  # chunked states other than "n bytes left"


class HttpError(Exception):
    """The engine broke the connection or HTTP itself (a stream error, not a connect error)."""


class ConnectionLost(HttpError):
    def __init__(self, what: str = "the connection closed") -> None:
        super().__init__(what)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: received bytes accumulate in `buf` until read."""

    def __init__(self, registry: set[_Connection]) -> None:
        self._registry = registry  # the client's open connections
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ended = False  # the engine closed its side, or the connection is lost
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _PAUSE_AT and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._registry.discard(self)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def more(self, timeout_s: float) -> None:
        """Wait until more bytes arrive; ConnectionLost if none can, TimeoutError after
        `timeout_s` of silence."""
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.ended:
            raise ConnectionLost()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        # call_later, not asyncio.timeout(): ~1 us instead of ~5 for every read.
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    @property
    def reusable(self) -> bool:
        """Idle, open, and nothing unasked-for arrived on it."""
        return not self.ended and not self.buf and not self.transport.is_closing()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.ended = True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """A response whose body is read as it arrives (`read_some`), then `release()`d (its
    connection goes back to the pool when the body was read to its end) or `close()`d."""

    def __init__(self, client: Http1Client, conn: _Connection, status: int,
                 headers: dict[str, str], read_timeout_s: float,
                 http11: bool = True) -> None:  # fmt: skip
        self._client = client
        self._conn = conn
        self.status = status
        self.headers = headers
        self._timeout = read_timeout_s
        connection = headers.get("connection", "").lower()
        # HTTP/1.1 keeps a connection unless told otherwise; HTTP/1.0 only when told to.
        self._keep_alive = "close" not in connection if http11 else "keep-alive" in connection
        encoding = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):  # no body, whatever the headers say
            self._framing, self._left = _SIZED, 0
        elif "chunked" in encoding:
            self._framing, self._left = _CHUNKED, _SIZE_LINE
        elif "content-length" in headers:
            self._framing = _SIZED
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise HttpError(f"bad Content-Length {headers['content-length']!r}") from None
            if self._left < 0:
                raise HttpError(f"bad Content-Length {headers['content-length']!r}")
        else:
            self._framing, self._left, self._keep_alive = _UNTIL_CLOSE, 0, False
        self.at_eof = self._framing == _SIZED and self._left == 0

    async def read_some(self) -> bytes:
        """The body bytes that have arrived (waiting for some), b"" at the body's end."""
        while not self.at_eof:
            data = self._take()
            if data:
                return data
            if self.at_eof:
                break
            try:
                await self._conn.more(self._timeout)
            except ConnectionLost:
                if self._framing != _UNTIL_CLOSE:
                    raise ConnectionLost("the engine closed the connection inside the body") from None
                self.at_eof = True
        return b""

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The rest of the body, at most `limit` bytes (then the connection is dropped)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (data := await self.read_some()):
            parts.append(data)
            size += len(data)
        if not self.at_eof:
            self.close()
        return b"".join(parts)[:limit]

    def _take(self) -> bytes:
        buf = self._conn.buf
        if not buf:
            return b""
        if self._framing == _SIZED:
            data = bytes(buf[: self._left])
            del buf[: len(data)]
            self._left -= len(data)
            self.at_eof = self._left == 0
            return data
        if self._framing == _UNTIL_CLOSE:
            data = bytes(buf)
            buf.clear()
            return data
        return self._take_chunks(buf)

    def _take_chunks(self, buf: bytearray) -> bytes:
        """Decode the chunked encoding as far as `buf` goes; what is decoded leaves it."""
        out: list[bytes] = []
        pos, end, left = 0, len(buf), self._left
        while pos < end:
            if left > 0:  # inside a chunk's data
                take = min(left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if left == 0:
                    left = _DATA_END
            elif left == _DATA_END:  # the CRLF after a chunk's data
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpError("chunk data not followed by CRLF")
                pos += 2
                left = _SIZE_LINE
            else:  # a chunk-size line, or a trailer line after the last chunk
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise HttpError("chunk-size line too long")
                    break
                line = bytes(buf[pos:nl])
                pos = nl + 2
                if left == _TRAILERS:
                    if not line:  # the empty line that ends the body
                        self.at_eof = True
                        break
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HttpError(f"bad chunk-size line {line[:40]!r}") from None
                if size < 0:
                    raise HttpError(f"bad chunk-size line {line[:40]!r}")
                left = size if size else _TRAILERS
        del buf[:pos]
        self._left = left
        return b"".join(out)

    def release(self) -> None:
        """Done with the response: its connection is reused if the body was read to its
        end, else closed."""
        conn = self._conn
        if self.at_eof and self._keep_alive and conn.reusable:
            self._client._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection now (the engine sees the disconnect and stops generating)."""
        self._conn.close()
        self.at_eof = True


class Http1Client:
    """Connections to one engine's base URL (`http://host:port/prefix`)."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 600.0) -> None:  # fmt: skip
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream URL must be http:// or https://host[:port]: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self._ssl else 80)
        self._host_header = host if default_port else f"{host}:{self.port}"
        self.prefix = url.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()  # every connection not yet closed, for close()
        self.connections_opened = 0

    async def request(self, method: str, path: str, body: bytes = b"", *,
                      content_type: str | None = None,
                      timeout_s: float | None = None) -> Response:  # fmt: skip
        """Send a request to `prefix + path`; returns once the response's headers are in.
        Raises OSError or TimeoutError when connecting fails, TimeoutError when no answer
        comes within the read timeout (or `timeout_s`), HttpError for a broken answer."""
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        message = (head + "\r\n").encode("latin-1") + body
        timeout = self.read_timeout_s if timeout_s is None else timeout_s
        while True:
            conn, reused = await self._acquire()
            try:
                conn.transport.write(message)  # type: ignore[union-attr]
                status, headers, http11 = await self._read_head(conn, timeout)
                return Response(self, conn, status, headers, timeout, http11)
            except ConnectionLost:
                conn.close()
                if reused and not conn.buf:
                    continue  # the engine had closed this idle connection: a new one
                raise
            except BaseException:  # a timeout, a bad answer, cancellation: drop it
                conn.close()
                raise

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, conn = await loop.create_connection(
                lambda: _Connection(self._open), self.host, self.port, ssl=self._ssl,
                server_hostname=self.host if self._ssl else None,
            )  # fmt: skip
        self.connections_opened += 1
        return conn, False

    @staticmethod
    async def _read_head(conn: _Connection, timeout_s: float) -> tuple[int, dict[str, str], bool]:
        """Status, headers and whether it is HTTP/1.1 (not 1.0), of the final response (1xx
        interim responses skipped)."""
        while True:
            buf = conn.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise HttpError("response headers too long")
                await conn.more(timeout_s)
                continue
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            status = int(code)
            if 100 <= status < 200 and status != 101:
                continue
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon:
                    raise HttpError(f"bad header line {line[:80]!r}")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            return status, headers, version != "HTTP/1.0"

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing
