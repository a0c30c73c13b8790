"""`create_app(backend, settings)`: the whole HTTP application, no side effects at import.

Shared objects live under typed `web.AppKey`s (proxy.state). The backend is started and
closed in a `cleanup_ctx`. Serve it with `make_runner(app)`, which turns on aiohttp's
handler cancellation: a client that disconnects cancels its handler, and with it the
backend request, at once (without it aiohttp only notices at the next write).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from dsml.tokenizer import V4Tokenizer, load_tokenizer
from proxy import __version__, state
from proxy.backends.base import Backend
from proxy.connections import GUARD, ConnectionGuard, GuardedRunner, guard_middleware
from proxy.limits import ConcurrencyLimiter
from proxy.metrics import Metrics
from proxy.middleware import Handler, auth_middleware, error_middleware, observe_middleware
from proxy.models import ModelRegistry
from proxy.reasoning_cache import ReasoningCache
from proxy.routes import anthropic, chat, completions, models, ops, responses
from proxy.settings import Settings
from proxy.turn import TurnRunner


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:  # glibc's; other C libraries have none (then nothing is trimmed)
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


@web.middleware
async def release_memory_middleware(request: web.Request, handler: Handler
                                    ) -> web.StreamResponse:
    """After a big request (read_json's `OFFLOAD`), hand the C heap's free pages back to the
    system: its parse, prompt and ids (hundreds of MB for 10^5 tools) are freed, but glibc
    keeps the pages, and the process would stay at its peak. On a worker thread (ctypes
    releases the GIL), beside whatever comes next."""
    try:
        return await handler(request)
    finally:
        if request.get(state.OFFLOAD) and _MALLOC_TRIM is not None:
            with contextlib.suppress(RuntimeError):  # the workers are shut down: no matter
                asyncio.get_running_loop().run_in_executor(request.app[state.WORKERS],
                                                           _MALLOC_TRIM, 0)


async def _workers_lifecycle(app: web.Application) -> AsyncIterator[None]:
    yield
    app[state.WORKERS].shutdown(wait=False, cancel_futures=True)


async def _backend_lifecycle(app: web.Application) -> AsyncIterator[None]:
    backend = app[state.BACKEND]
    start = getattr(backend, "start", None)  # optional: not part of the Backend protocol
    if start is not None:
        await start()
    yield
    await backend.close()


def create_app(
    backend: Backend, settings: Settings | None = None, *, tokenizer: V4Tokenizer | None = None
) -> web.Application:
    settings = settings or Settings()
    tokenizer = tokenizer or load_tokenizer()
    registry = ModelRegistry(settings.model_name, settings.default_thinking, settings.dialect,
                             settings.models, engine=backend)
    metrics = Metrics(version=__version__, dialect=registry.dialects, backend=backend.name)
    engine_stats = getattr(backend, "engine_stats", None)  # the embedded backend's engine
    if engine_stats is not None:
        metrics.watch_engine(engine_stats)
    cache = ReasoningCache(settings.reasoning_cache_size)

    # The body limit is checked by read_json (413 in our error shape); aiohttp's own limit
    # sits just above it as a backstop for handlers that read bodies another way.
    app = web.Application(
        # anthropic_errors answers /v1/messages errors (auth's included) in Anthropic's shape.
        middlewares=[guard_middleware, release_memory_middleware, observe_middleware,
                     error_middleware, anthropic.anthropic_errors, auth_middleware],
        client_max_size=settings.max_body_bytes + 1,
    )
    app[state.SETTINGS] = settings
    app[GUARD] = ConnectionGuard(settings.max_connections, settings.client_timeout_s)
    app[state.BACKEND] = backend
    app[state.TOKENIZER] = tokenizer
    app[state.METRICS] = metrics
    app[state.MODELS] = registry
    app[state.LIMITER] = ConcurrencyLimiter(
        settings.max_concurrency, settings.max_queue, settings.retry_after_s
    )
    app[state.REASONING_CACHE] = cache
    app[state.RUNNER] = TurnRunner(
        backend, tokenizer, metrics, reasoning_cache=cache,
        recover_empty_turns=settings.recover_empty_turns,
        strict_tool_calls=settings.strict_tool_calls, dialect=settings.dialect,
        constrained_decoding=settings.constrained_decoding,
    )
    app[state.WORKERS] = ThreadPoolExecutor(settings.worker_threads,
                                            thread_name_prefix="dsml-proxy-worker")
    app.cleanup_ctx.append(_backend_lifecycle)
    app.cleanup_ctx.append(_workers_lifecycle)

    app.router.add_post("/v1/chat/completions", chat.chat_completions)
    app.router.add_post("/v1/completions", completions.completions)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model_id:.+}", models.get_model)  # ids may hold "/"
    app.router.add_get("/health", ops.health)
    app.router.add_get("/ready", ops.ready)
    app.router.add_get("/metrics", ops.metrics)
    anthropic.add_routes(app)  # POST /v1/messages, /v1/messages/count_tokens
    responses.add_routes(app)  # POST /v1/responses
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """An AppRunner that cancels a handler when its client disconnects, and bounds client
    connections (proxy.connections: how many, and how long a request may take to come)."""
    return GuardedRunner(app, handler_cancellation=True, access_log=None)


def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM (what `web.run_app` does, through `make_runner`)."""

    async def main() -> None:
        runner = make_runner(app)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
