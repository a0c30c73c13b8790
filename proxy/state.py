"""Typed keys of the objects an app shares between its handlers (aiohttp `AppKey`s)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from dsml.tokenizer import V4Tokenizer
from proxy.backends.base import Backend
from proxy.limits import ConcurrencyLimiter
from proxy.metrics import Metrics
from proxy.models import ModelRegistry
from proxy.reasoning_cache import ReasoningCache
from proxy.settings import Settings
from proxy.turn import TurnRunner

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
TOKENIZER = web.AppKey("tokenizer", V4Tokenizer)
METRICS = web.AppKey("metrics", Metrics)
MODELS = web.AppKey("models", ModelRegistry)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)
REASONING_CACHE = web.AppKey("reasoning_cache", ReasoningCache)
RUNNER = web.AppKey("runner", TurnRunner)
# Worker threads for a big request's parsing, rendering and tokenizing (proxy.routes.common).
WORKERS = web.AppKey("workers", ThreadPoolExecutor)

# Per-request values, set by proxy.middleware.
REQUEST_ID = web.RequestKey("request_id", str)
CLOCK = web.RequestKey("clock", object)  # proxy.timing.RequestClock
STREAM = web.RequestKey("stream", bool)
LOG_FIELDS = web.RequestKey("log_fields", dict)
OFFLOAD = web.RequestKey("offload", bool)  # set by read_json: this request's work goes to WORKERS
