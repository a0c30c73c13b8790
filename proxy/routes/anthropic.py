"""POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages, as Claude Code uses it).

Same turn runner, renderer, parser, backends, recovery and metrics as chat completions; only
the request translation (`proxy.translate.anthropic`) and the encoder differ. Errors leave in
Anthropic's shape through `anthropic_errors`, which sits inside the app's error middleware
and outside auth, so a bad key is answered in that shape too.

Message threads (`thread`, what the SDK's `beta.messages.tool_runner` sends by default): a
reply to `create` or `continue` is kept in the response store (the one behind Responses'
`previous_response_id`: bounded, expiring, in memory) under its message id, with the whole
conversation up to it and the thread's `system` and `tools`. A `continue` names that id and
sends only the new messages; an unknown or expired id is a 404 with `error.details.error_code`
`thread_not_found`, on which the SDK replays the whole history under a new thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from dsml.prompt import Prompt
from dsml.request import render_chat
from proxy import state
from proxy.backends.base import SamplingParams
from proxy.encoders.anthropic import AnthropicStreamEncoder, anthropic_error, message_body
from proxy.errors import ApiError
from proxy.middleware import Handler, api_error_for
from proxy.models import ModelSpec
from proxy.response_store import StoredThread, app_store
from proxy.routes.common import drain, off_loop, prepare_turn, read_json, stream_turn
from proxy.signature import app_signer
from proxy.translate.anthropic import to_chat
from proxy.turn import count_prompt_tokens
from schemas.anthropic import CountTokensRequest, MessageParam, MessagesRequest

ENDPOINT = "messages"
PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def add_routes(app: web.Application) -> None:
    app_signer(app)
    app.router.add_post(PATHS[0], messages)
    app.router.add_post(PATHS[1], count_tokens)


def render(app: web.Application, req: CountTokensRequest, model: ModelSpec
           ) -> tuple[Prompt, bool]:
    """The prompt in the model's dialect, and whether calls may be parallel (a worker
    thread runs this for a big request: proxy.routes.common.off_loop)."""
    chat, parallel = to_chat(req, app_signer(app))
    app[state.REASONING_CACHE].backfill(chat["messages"])
    prompt = render_chat(chat, dialect=model.dialect, default_thinking=model.thinking)
    return prompt, parallel


def with_thread(app: web.Application, req: MessagesRequest) -> MessagesRequest:
    """The request with its thread's history, `system` and `tools` (a `continue`)."""
    thread = req.thread
    if thread is None:
        return req
    if thread.type == "create":
        if thread.previous_message_id is not None:
            raise ApiError(400, "thread.previous_message_id belongs to a continue, not a create",
                           param="thread.previous_message_id")
        return req
    if not thread.previous_message_id:
        raise ApiError(400, "a thread continue needs previous_message_id",
                       param="thread.previous_message_id")
    stored = app_store(app).get(thread.previous_message_id)
    if not isinstance(stored, StoredThread):
        raise ApiError(404, f"no thread holds message {thread.previous_message_id!r}: it is "
                       "unknown, or expired (threads are kept in memory for a bounded time; "
                       "see the README); send the whole conversation with a new thread",
                       code="thread_not_found")
    for field in ("system", "tools"):
        if getattr(req, field) is not None:
            raise ApiError(400, f"{field} comes from the thread on a continue; do not send it "
                           "again (start a new thread to change it)", param=field)
    return req.model_copy(update={"messages": [*stored.messages, *req.messages],
                                  "system": stored.system, "tools": stored.tools})


def keep_thread(app: web.Application, req: MessagesRequest, body: dict[str, Any]) -> None:
    """Store a thread's reply (`body`, as the client received it) for the next continue."""
    reply = MessageParam.model_validate({"role": "assistant", "content": body["content"]})
    app_store(app).put(body["id"], StoredThread([*req.messages, reply], req.system, req.tools))


async def messages(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = await off_loop(request, MessagesRequest.model_validate, await read_json(request))
    request[state.LOG_FIELDS]["model"] = req.model
    req = with_thread(app, req)
    model = await app[state.MODELS].resolve(req.model)  # 404 for an unknown model
    prompt, parallel = await off_loop(request, render, app, req, model)
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
            streamed = await stream_turn(request, turn, encoder,
                                         keepalive_s=app[state.SETTINGS].keepalive_interval_s)
            if req.thread is not None and turn.result is not None and encoder.finished:
                # The message the stream delivered: same id, blocks and signatures.
                keep_thread(app, req, message_body(turn, req.model, app_signer(app), encoder.id))
            return streamed
        await drain(request, turn)
    body = message_body(turn, req.model, app_signer(app))
    if req.thread is not None:
        keep_thread(app, req, body)
    return web.json_response(body)


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's length with the real tokenizer: rendered exactly as /v1/messages would."""
    app = request.app
    req = await off_loop(request, CountTokensRequest.model_validate, await read_json(request))
    model = await app[state.MODELS].resolve(req.model)  # 404 for an unknown model

    def count() -> int:
        prompt, _ = render(app, req, model)
        return count_prompt_tokens(app[state.TOKENIZER], prompt)

    return web.json_response({"input_tokens": await off_loop(request, count)})


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
