"""The one protocol between the proxy and whatever generates tokens.

The embedded engine and every upstream HTTP server implement it, so the turn runner never
branches on which backend it has (architecture.md). A backend streams text deltas with
special tokens kept (`</think>`, `｜DSML｜`, EOS): the DSML parser needs them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the backend's limit (context left)
    temperature: float | None = None  # None: the backend's default
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output


@dataclass(slots=True)
class GenerateRequest:
    prompt_ids: list[int] | None  # preferred: safe against forged control tokens (dsml.md 4)
    prompt_text: str | None  # for upstreams that only take text
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # `prompt_ids` as a JSON array, where the caller has it for free (the turn runner builds
    # it from cached pieces, dsml.tokenizer.encode_prompt_json): an HTTP backend sends it as
    # is instead of serializing ~1,000 ids per request. None: serialize `prompt_ids`.
    prompt_ids_json: str | None = None
    # Constrained decoding (proxy.backends.constraints): the llguidance Lark grammar of
    # what this generation may write, None for none.
    grammar: str | None = None


@dataclass(slots=True)
class GenerateDelta:
    text: str  # detokenized text, special tokens kept
    num_tokens: int  # tokens this delta covers
    finish_reason: str | None = None  # "stop" | "length" | None while running
    # With finish_reason "stop": the stop string that ended generation (excluded from the
    # text). None for EOS, a stop token id, or a backend that does not say which matched.
    stop_reason: str | None = None


class BackendError(Exception):
    """A backend failed. `reason` is the label of dsml_proxy_upstream_errors_total."""

    REASONS = ("connect", "timeout", "status", "stream")

    def __init__(self, reason: str, message: str, *, status: int | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"BackendError reason must be one of {self.REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status  # the upstream's HTTP status for reason="status"

    def __repr__(self) -> str:
        return f"BackendError(reason={self.reason!r}, status={self.status}, message={self.message!r})"


@runtime_checkable
class Backend(Protocol):
    name: str  # "upstream:vllm", "embedded": the `backend` label of dsml_proxy_build_info

    def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Stream deltas (write it as an `async def ... yield` generator).

        Cancelling the consuming task, or `aclose()` on the iterator, must cancel the
        generation at once (an upstream connection is closed). Failures raise BackendError.
        """
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...
