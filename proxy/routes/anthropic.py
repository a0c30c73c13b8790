"""POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages, as Claude Code uses it).

Same turn runner, renderer, parser, backends, recovery and metrics as chat completions; only
the request translation (`proxy.translate.anthropic`) and the encoder differ. Errors leave in
Anthropic's shape through `anthropic_errors`, which sits inside the app's error middleware
and outside auth, so a bad key is answered in that shape too.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from aiohttp import web

from dsml.prompt import Prompt
from dsml.request import render_chat
from proxy import state
from proxy.backends.base import SamplingParams
from proxy.encoders.anthropic import AnthropicStreamEncoder, anthropic_error, message_body
from proxy.middleware import Handler, api_error_for
from proxy.models import ModelSpec
from proxy.routes.common import drain, off_loop, prepare_turn, read_json, stream_turn
from proxy.signature import app_signer
from proxy.translate.anthropic import to_chat
from proxy.turn import count_prompt_tokens
from schemas.anthropic import CountTokensRequest, MessagesRequest

ENDPOINT = "messages"
R = TypeVar("R", bound=CountTokensRequest)
PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def add_routes(app: web.Application) -> None:
    app_signer(app)
    app.router.add_post(PATHS[0], messages)
    app.router.add_post(PATHS[1], count_tokens)


def render(app: web.Application, req: CountTokensRequest) -> tuple[Prompt, bool, ModelSpec]:
    """The prompt in the model's dialect, whether calls may be parallel, and the model."""
    model = app[state.MODELS].get(req.model)  # 404 for an unknown model
    chat, parallel = to_chat(req, app_signer(app))
    app[state.REASONING_CACHE].backfill(chat["messages"])
    prompt = render_chat(chat, dialect=model.dialect, default_thinking=model.thinking)
    return prompt, parallel, model


async def messages(request: web.Request) -> web.StreamResponse:
    app = request.app
    req, (prompt, parallel, model) = await off_loop(
        request, prepare, app, MessagesRequest, await read_json(request))
    request[state.LOG_FIELDS]["model"] = req.model
    sampling = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                              top_p=req.top_p, top_k=req.top_k,
                              stop=list(req.stop_sequences or ()))
    clock = request[state.CLOCK]
    async with app[state.LIMITER].slot(clock):  # queueing is a wait, not overhead
        turn = app[state.RUNNER].start(prompt, sampling, endpoint=ENDPOINT, clock=clock,
                                       parallel_tool_calls=parallel, dialect=model.dialect)
        await prepare_turn(request, turn)
        if req.stream:
            encoder = AnthropicStreamEncoder(turn, req.model, app_signer(app))
            return await stream_turn(request, turn, encoder,
                                     keepalive_s=app[state.SETTINGS].keepalive_interval_s)
        await drain(request, turn)
    return web.json_response(message_body(turn, req.model, app_signer(app)))


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's length with the real tokenizer: rendered exactly as /v1/messages would."""
    app = request.app

    def count(body: dict[str, Any]) -> int:
        _, (prompt, _, _) = prepare(app, CountTokensRequest, body)
        return count_prompt_tokens(app[state.TOKENIZER], prompt)

    return web.json_response({"input_tokens": await off_loop(request, count,
                                                             await read_json(request))})


def prepare(app: web.Application, schema: type[R], body: dict[str, Any]
            ) -> tuple[R, tuple[Prompt, bool, ModelSpec]]:
    req = schema.model_validate(body)
    return req, render(app, req)


@web.middleware
async def anthropic_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PATHS:
        return await handler(request)
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        err = api_error_for(request, exc)
        status, body = anthropic_error(err)
        return web.json_response(body, status=status, headers=err.headers)
