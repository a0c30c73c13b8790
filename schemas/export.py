"""Export the wire models as JSON Schema files into schemas/json/ (for users' own tests).

One file per model, `{name}.json` with the names in `MODELS`; users import them, so a name
once published is not changed.

    python -m schemas.export          # rewrite the files
    python -m schemas.export --check  # exit 1 if a file is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.anthropic import CountTokensRequest, ErrorBody, Message, MessagesRequest
from schemas.errors import ErrorResponse
from schemas.openai_chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from schemas.openai_completions import Completion, CompletionRequest
from schemas.openai_models import Model, ModelList
from schemas.responses import ResponsesRequest

JSON_DIR = Path(__file__).parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "chat_completion_request": ChatCompletionRequest,
    "chat_completion": ChatCompletion,
    "chat_completion_chunk": ChatCompletionChunk,
    "completion_request": CompletionRequest,
    "completion": Completion,
    "model": Model,
    "model_list": ModelList,
    "error": ErrorResponse,
    # Anthropic Messages (/v1/messages, /v1/messages/count_tokens); prefixed because their
    # names (message, error) would otherwise collide with the OpenAI ones.
    "anthropic_messages_request": MessagesRequest,
    "anthropic_count_tokens_request": CountTokensRequest,
    "anthropic_message": Message,
    "anthropic_error": ErrorBody,
    # OpenAI Responses (/v1/responses): schemas/responses.py defines the request only.
    "responses_request": ResponsesRequest,
}


def render_schemas() -> dict[str, str]:
    """File name -> file text. Requests are exported as validated, responses as serialized."""
    out = {}
    for name, model in MODELS.items():
        mode = "validation" if name.endswith("_request") else "serialization"
        schema = model.model_json_schema(mode=mode)
        out[f"{name}.json"] = json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for file_name, text in render_schemas().items():
        path = JSON_DIR / file_name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(file_name)
        if "--check" not in argv:
            path.write_text(text, encoding="utf-8")
    if stale and "--check" in argv:
        print("out of date: " + ", ".join(stale) + " (run: python -m schemas.export)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
