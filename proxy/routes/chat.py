"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dsml.prompt import Prompt
from dsml.request import render_chat
from proxy import state
from proxy.backends.base import SamplingParams
from proxy.encoders.chat import ChatStreamEncoder, chat_completion_body
from proxy.errors import ApiError
from proxy.models import ModelSpec
from proxy.routes.common import drain, off_loop, prepare_turn, read_json, stream_turn
from proxy.sampling import extra_sampling
from proxy.translate import allowed_tool_names
from schemas.openai_chat import ChatCompletionRequest

ENDPOINT = "chat_completions"


def narrow_allowed_tools(payload: dict[str, Any]) -> None:
    """`tool_choice: {"type": "allowed_tools", ...}` -> only those tools, and their mode.

    V4 has no way to be told "these tools exist but only those may be called", so the
    prompt offers just the allowed ones (the model cannot call what it was not shown).
    """
    choice = payload.get("tool_choice")
    if not (isinstance(choice, dict) and choice.get("type") == "allowed_tools"):
        return
    allowed = choice["allowed_tools"]
    names = allowed_tool_names(allowed["tools"], "tool_choice.allowed_tools.tools")
    tools = [t for t in payload.get("tools") or [] if t["function"]["name"] in names]
    unknown = names - {t["function"]["name"] for t in tools}
    if unknown:
        raise ApiError(400, f"tool_choice.allowed_tools names undeclared tools: {sorted(unknown)}",
                       param="tool_choice.allowed_tools.tools")
    payload["tools"] = tools
    payload["tool_choice"] = allowed["mode"] if tools else "none"


def render(app: web.Application, chat: ChatCompletionRequest, model: ModelSpec) -> Prompt:
    """The prompt in the model's dialect (image parts: UnsupportedError, a 400)."""
    payload = chat.model_dump(exclude_none=True, by_alias=True)
    narrow_allowed_tools(payload)
    app[state.REASONING_CACHE].backfill(payload["messages"])
    return render_chat(payload, dialect=model.dialect, default_thinking=model.thinking)


def sampling(chat: ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    return SamplingParams(
        # max_completion_tokens counts reasoning too, like the turn budget does.
        max_tokens=chat.max_completion_tokens or chat.max_tokens,
        temperature=chat.temperature,
        top_p=chat.top_p,
        top_k=chat.top_k,
        seed=chat.seed,
        stop=chat.stop_list(),
        logprobs=chat.logprobs_count(),
        **extra_sampling(chat, vocab_size),
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    chat = await off_loop(request, ChatCompletionRequest.model_validate, await read_json(request))
    request[state.LOG_FIELDS]["model"] = chat.model
    model = await app[state.MODELS].resolve(chat.model)  # 404 for an unknown model
    prompt = await off_loop(request, render, app, chat, model)
    async with app[state.LIMITER].slot(request[state.CLOCK]):
        turn = app[state.RUNNER].start(
            prompt, sampling(chat, app[state.TOKENIZER].vocab_size), endpoint=ENDPOINT,
            clock=request[state.CLOCK],
            parallel_tool_calls=chat.parallel_tool_calls is not False, dialect=model.dialect,
        )
        await prepare_turn(request, turn)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            encoder = ChatStreamEncoder(chat.model, include_usage=include_usage)
            return await stream_turn(request, turn, encoder,
                                     keepalive_s=app[state.SETTINGS].keepalive_interval_s)
        await drain(request, turn)
    return web.json_response(chat_completion_body(turn, chat.model))
