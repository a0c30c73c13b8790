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
    # The fields below are passed on or refused, never dropped (api.md, "Sampling fields"):
    # `check_sampling` names the first one a backend cannot honour. None: unset.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's: > 1 discourages tokens already seen
    min_p: float | None = None
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit
    # The sampled token's logprob and this many top alternatives per token (0-20); None: off.
    logprobs: int | None = None


# SamplingParams fields that only some backends take (each backend's `sampling_fields`).
OPTIONAL_SAMPLING_FIELDS = ("top_k", "seed", "frequency_penalty", "presence_penalty",
                            "repetition_penalty", "min_p", "logit_bias", "logprobs")


def check_sampling(backend_name: str, supported: frozenset[str], sampling: SamplingParams) -> None:
    """A 400 naming the first set field the backend cannot honour (never dropped silently)."""
    for name in OPTIONAL_SAMPLING_FIELDS:
        if name not in supported and getattr(sampling, name) is not None:
            from proxy.errors import ApiError  # here: proxy.errors imports this module

            raise ApiError(400, f"`{name}` is not supported by the {backend_name} backend",
                           param=name, code="unsupported_parameter")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely tokens at its position
    (`top`: (token, logprob), most likely first). Token strings are the engine's (a token
    that holds part of a UTF-8 character shows as the engine writes it)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(slots=True)
class GenerateRequest:
    prompt_ids: list[int] | None  # preferred: safe against forged control tokens (dsml.md 4)
    prompt_text: str | None  # for upstreams that only take text
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # `prompt_ids` as a JSON array, where the caller has it for free (the turn runner builds
    # it from cached pieces, dsml.tokenizer.encode_prompt_json): an HTTP backend sends it as
    # is instead of serializing ~1,000 ids per request. None: serialize `prompt_ids`.
    prompt_ids_json: str | None = None
    # Ask for the generated token ids along with the text (`GenerateDelta.token_ids`), where
    # the backend can return them: a turn that may be continued (forced tool choice in
    # thinking mode, empty-turn recovery) continues from the model's own ids (proxy.turn).
    return_token_ids: bool = False
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
    # With SamplingParams.logprobs: one entry per token of this delta, in order (a backend
    # may give fewer, e.g. none for a usage correction). None: not asked for.
    logprobs: list[TokenLogprob] | None = None
    # The ids of the tokens this delta covers, where the backend returned them (asked for by
    # `GenerateRequest.return_token_ids`); None where it did not.
    token_ids: list[int] | None = None


class BackendError(Exception):
    """A backend failed. `reason` is the label of dsml_proxy_upstream_errors_total."""

    REASONS = ("connect", "timeout", "status", "stream")

    def __init__(self, reason: str, message: str, *, status: int | None = None,
                 detail: str | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"BackendError reason must be one of {self.REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message  # goes to the client: never the engine's address or body
        self.status = status  # the upstream's HTTP status for reason="status"
        self.detail = detail  # for the log only (the engine's error text, the socket error)

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
