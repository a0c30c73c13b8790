"""Legacy Completions encoding (`text_completion`): raw text, no parsing."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

_dumps = json.dumps


def new_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionStreamEncoder:
    def __init__(self, model: str, *, include_usage: bool) -> None:
        self.include_usage = include_usage
        self._head = (
            f'data: {{"id":"{new_completion_id()}","object":"text_completion",'
            f'"created":{int(time.time())},"model":{_dumps(model)},"choices":'
        )

    def text(self, text: str, logprobs: dict[str, Any] | None = None) -> bytes:
        lp = "null" if logprobs is None else _dumps(logprobs)
        return (f'{self._head}[{{"index":0,"text":{_dumps(text)},"logprobs":{lp},'
                f'"finish_reason":null}}],"usage":null}}\n\n').encode()

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = (f'{self._head}[{{"index":0,"text":"","logprobs":null,'
               f'"finish_reason":"{finish_reason}"}}],"usage":null}}\n\n').encode()
        if self.include_usage:
            usage = _dumps(usage_dict(prompt_tokens, completion_tokens))
            out += f'{self._head}[],"usage":{usage}}}\n\n'.encode()
        return out + b"data: [DONE]\n\n"


def completion_body(model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, logprobs: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    return {
        "id": new_completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }
