"""POST /v1/completions: a raw prompt (text or token ids) straight to the backend.

For debugging and for clients that format DeepSeek prompts themselves: no rendering and no
DSML parsing. A text prompt is tokenized with control strings matched (the client wrote the
whole prompt, so there is nothing to forge); for a model whose dialect has another tokenizer
than V4's (v4.1, v3.2: proxy.turn.sends_ids) it goes to the engine as text instead.
"""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from dsml.dialects import Dialect
from proxy import state
from proxy.backends.base import GenerateRequest, SamplingParams, TokenLogprob
from proxy.encoders.completions import CompletionStreamEncoder, completion_body
from proxy.errors import ApiError, sse_error_event, to_api_error
from proxy.logprobs import legacy_logprobs
from proxy.logs import ACCESS_LOGGER
from proxy.routes.common import check_prompt_tokens, off_loop, read_json, tokenize_within
from proxy.sampling import extra_sampling
from proxy.turn import sends_ids
from schemas.openai_completions import CompletionRequest

ENDPOINT = "completions"
log = logging.getLogger(ACCESS_LOGGER)


def generate_request(app: web.Application, req: CompletionRequest,
                     dialect: Dialect) -> GenerateRequest:
    tokenizer = app[state.TOKENIZER]
    if isinstance(req.prompt, str) and not sends_ids(dialect):
        # The V4 tokenizer is not this model's (proxy.turn.sends_ids): the engine tokenizes.
        ids, text = None, req.prompt
    elif isinstance(req.prompt, str):
        ids, text = tokenizer.encode_generated(req.prompt), req.prompt
    else:
        bad = [i for i in req.prompt if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token ids out of range: {bad[:5]}", param="prompt")
        ids, text = list(req.prompt), tokenizer.decode(req.prompt)
    sampling = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                              top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                              stop=req.stop_list(), logprobs=req.logprobs,
                              **extra_sampling(req, tokenizer.vocab_size))
    return GenerateRequest(prompt_ids=ids, prompt_text=text, sampling=sampling)


def prompt_tokens(app: web.Application, gen: GenerateRequest) -> int:
    if gen.prompt_ids is not None:
        return len(gen.prompt_ids)
    # A text prompt the engine tokenizes: counted with the V4 tokenizer (an estimate).
    return len(app[state.TOKENIZER].encode_generated(gen.prompt_text or ""))


async def completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = await off_loop(request, CompletionRequest.model_validate, await read_json(request))
    dialect = (await app[state.MODELS].resolve(req.model)).dialect  # 404 for unknown names

    def prepare() -> tuple[GenerateRequest, int]:
        gen = generate_request(app, req, dialect)
        return gen, prompt_tokens(app, gen)

    bound = app[state.SETTINGS].max_prompt_tokens
    gen, num_prompt = await off_loop(request, tokenize_within, bound, prepare)
    check_prompt_tokens(request, num_prompt)
    metrics, clock = app[state.METRICS], request[state.CLOCK]
    async with app[state.LIMITER].slot(request[state.CLOCK]):
        deltas = app[state.RUNNER].deltas(gen, endpoint=ENDPOINT, clock=clock)
        num_completion, finish, texts = 0, "stop", []
        async with aclosing(deltas):
            if not req.stream:
                entries: list[TokenLogprob] = []
                async for delta in deltas:
                    texts.append(delta.text)
                    num_completion += delta.num_tokens
                    finish = delta.finish_reason or finish
                    entries.extend(delta.logprobs or ())
                logprobs = (None if req.logprobs is None
                            else legacy_logprobs(entries, 0, req.logprobs))
                body = completion_body(req.model, "".join(texts), finish, num_prompt,
                                       num_completion, logprobs)
                response: web.StreamResponse = web.json_response(body)
            else:
                request[state.STREAM] = True
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                encoder = CompletionStreamEncoder(req.model, include_usage=include_usage)
                first = await anext(deltas, None)  # before prepare: 502/504 stay HTTP errors
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
                try:
                    delta = first
                    offset = 0  # of the next token in the completion's text (text_offset)
                    while delta is not None:
                        num_completion += delta.num_tokens
                        finish = delta.finish_reason or finish
                        if delta.text:
                            logprobs = (None if req.logprobs is None else
                                        legacy_logprobs(delta.logprobs or [], offset, req.logprobs))
                            offset += len(delta.text)
                            await response.write(encoder.text(delta.text, logprobs))
                        delta = await anext(deltas, None)
                    await response.write(encoder.finish(finish, num_prompt, num_completion))
                except Exception as exc:  # the status line is gone: an SSE error event
                    err = to_api_error(exc)
                    if err is None:
                        log.exception("unhandled error mid-stream", extra={"fields": {
                            "request_id": request[state.REQUEST_ID]}})
                        err = ApiError(500, f"internal error ({type(exc).__name__})",
                                       code="internal_error")
                    request[state.LOG_FIELDS]["error"] = err.message
                    await response.write(sse_error_event(err))
                await response.write_eof()
    metrics.tokens.labels("prompt").inc(num_prompt)
    metrics.tokens.labels("completion").inc(num_completion)
    return response
