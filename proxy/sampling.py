"""The request's sampling fields beyond temperature and top_p, as the backend's options.

api.md: `frequency_penalty`, `presence_penalty`, `logit_bias`, vLLM's `min_p` and
`repetition_penalty` (and `logprobs`, `seed`, `top_k`, set by each route) are passed to the
backend, which honours them or answers a 400 naming the field (proxy.backends.base
.check_sampling). Nothing here is dropped.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import ApiError
from schemas.openai_chat import SamplingFields


def extra_sampling(req: SamplingFields, vocab_size: int) -> dict[str, Any]:
    """SamplingParams keyword arguments of `req`'s extra fields; a 400 for a logit_bias key
    outside the vocabulary (the keys are token ids of the V4 tokenizer)."""
    bias = req.token_bias()
    if bias:
        bad = sorted(t for t in bias if t >= vocab_size)
        if bad:
            raise ApiError(400, f"logit_bias: token ids out of range (vocabulary of {vocab_size}): "
                           f"{bad[:5]}", param="logit_bias", code="invalid_value")
    return {"frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
            "repetition_penalty": req.repetition_penalty, "min_p": req.min_p,
            "logit_bias": bias}
