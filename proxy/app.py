"""`create_app(backend, settings)`: the whole HTTP application, no side effects at import.

Shared objects live under typed `web.AppKey`s (proxy.state). The backend is started and
closed in a `cleanup_ctx`. Serve it with `make_runner(app)`, which turns on aiohttp's
handler cancellation: a client that disconnects cancels its handler, and with it the
backend request, at once (without it aiohttp only notices at the next write).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from dsml.tokenizer import V4Tokenizer, load_tokenizer
from proxy import __version__, state
from proxy.backends.base import Backend
from proxy.limits import ConcurrencyLimiter
from proxy.metrics import Metrics
from proxy.middleware import auth_middleware, error_middleware, observe_middleware
from proxy.models import ModelRegistry
from proxy.reasoning_cache import ReasoningCache
from proxy.routes import anthropic, chat, completions, models, ops, responses
from proxy.settings import Settings
from proxy.turn import TurnRunner


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
                             settings.models)
    metrics = Metrics(version=__version__, dialect=registry.dialects, backend=backend.name)
    cache = ReasoningCache(settings.reasoning_cache_size)

    # The body limit is checked by read_json (413 in our error shape); aiohttp's own limit
    # sits just above it as a backstop for handlers that read bodies another way.
    app = web.Application(
        # anthropic_errors answers /v1/messages errors (auth's included) in Anthropic's shape.
        middlewares=[observe_middleware, error_middleware, anthropic.anthropic_errors,
                     auth_middleware],
        client_max_size=settings.max_body_bytes + 1,
    )
    app[state.SETTINGS] = settings
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
    app.cleanup_ctx.append(_backend_lifecycle)

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
    """An AppRunner that cancels a handler when its client disconnects."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None)
