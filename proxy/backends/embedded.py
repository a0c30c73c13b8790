"""The embedded backend: DeepSeek-V4-Flash running in this process (engine.runtime.Engine).

`dsml-proxy serve --model DIR` (and `--demo`, on a tiny random checkpoint) serve through it.
It speaks the same Backend protocol as the upstream servers: prompt ids in (text only as a
fallback, tokenized as model output would be), text deltas out with special tokens kept,
cancellable. The engine does the detokenisation and stop-string handling; this file only
translates the proxy's sampling options and merges token steps into deltas. Every sampling
field is computed by the engine (engine/sampling.py): penalties, bias and min-p in its
sampler, logprobs from its logits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from engine.runtime import Engine
from engine.sampling import SamplingParams as EngineSampling
from engine.sampling import TokenLogprobs
from proxy.backends.base import (
    OPTIONAL_SAMPLING_FIELDS,
    GenerateDelta,
    GenerateRequest,
    SamplingParams,
    TokenLogprob,
)
from proxy.errors import ApiError

# DeepSeek's API defaults, used when a request leaves an option unset.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


class EmbeddedBackend:
    name = "embedded"
    sampling_fields = frozenset(OPTIONAL_SAMPLING_FIELDS)  # all of them

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        engine_path: str = "auto", **cache: Any) -> EmbeddedBackend:
        """Load a checkpoint directory (blocking: seconds for the demo, minutes for the real
        model); `cache`: Engine's prefix_cache / prefix_cache_disk(_bytes) options."""
        return cls(Engine.from_checkpoint(path, device=device, engine_path=engine_path, **cache))

    def sampling_for(self, sampling: SamplingParams, prompt_len: int,
                     mask: Any = None) -> EngineSampling:
        """The engine's options for a request; unset ones take DeepSeek's defaults, and an
        unset max_tokens the context left after the prompt; `mask`: the engine's logits mask
        (a proxy.backends.grammar_mask.GrammarMask)."""
        context_left = self.engine.max_new_tokens(prompt_len)
        return EngineSampling(
            max_tokens=(context_left if sampling.max_tokens is None
                        else min(sampling.max_tokens, context_left)),
            temperature=DEFAULT_TEMPERATURE if sampling.temperature is None else sampling.temperature,
            top_p=DEFAULT_TOP_P if sampling.top_p is None else sampling.top_p,
            top_k=sampling.top_k or 0,
            seed=sampling.seed,
            stop=tuple(sampling.stop),
            frequency_penalty=sampling.frequency_penalty or 0.0,
            presence_penalty=sampling.presence_penalty or 0.0,
            repetition_penalty=(1.0 if sampling.repetition_penalty is None
                                else sampling.repetition_penalty),
            min_p=sampling.min_p or 0.0,
            logit_bias=self._checked_bias(sampling.logit_bias),
            logprobs=sampling.logprobs,
            logits_mask=mask,
        )

    def _checked_bias(self, bias: dict[int, float] | None) -> dict[int, float]:
        vocab = self.engine.model.config.vocab_size
        bad = sorted(t for t in bias or () if not 0 <= t < vocab)
        if bad:
            raise ValueError(f"logit_bias: token ids out of the model's vocabulary ({vocab}): "
                             f"{bad[:5]}")
        return dict(bias or {})

    def _entry(self, lp: TokenLogprobs, token_id: int) -> TokenLogprob:
        decode = self.engine.tokenizer.decode
        return TokenLogprob(decode([token_id]), lp.logprob,
                            tuple((decode([t]), v) for t, v in lp.top))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        if req.prompt_ids is not None:
            prompt_ids = list(req.prompt_ids)
        elif req.prompt_text is not None:
            # Rendered prompt text: its control strings must become their ids, as in training.
            prompt_ids = self.engine.tokenizer.encode_generated(req.prompt_text)
        else:
            raise ValueError("GenerateRequest needs prompt_ids or prompt_text")
        if self.engine.max_new_tokens(len(prompt_ids)) < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the embedded engine's "
                           f"context is {self.engine.max_seq_len}", code="context_length_exceeded")
        mask = None
        if req.grammar is not None:
            from proxy.backends.grammar_mask import GrammarMask

            # Compiling a grammar the first time takes milliseconds: off the event loop.
            mask = await asyncio.to_thread(GrammarMask, req.grammar, len(prompt_ids))
        try:
            sampling = self.sampling_for(req.sampling, len(prompt_ids), mask)
        except ValueError as e:  # out-of-range options the request schema let through
            raise ApiError(400, str(e)) from None
        pending: list[int] = []  # tokens whose text is held back (a split UTF-8 char, a stop prefix)
        entries: list[TokenLogprob] | None = None if sampling.logprobs is None else []
        async for step in self.engine.stream(prompt_ids, sampling):
            pending.append(step.token_id)
            if entries is not None and step.logprobs is not None:
                entries.append(self._entry(step.logprobs, step.token_id))
            if step.text or step.finish_reason is not None:
                yield GenerateDelta(text=step.text, num_tokens=len(pending),
                                    finish_reason=step.finish_reason, stop_reason=step.stop_reason,
                                    logprobs=entries, token_ids=pending)
                pending = []
                entries = None if entries is None else []

    def engine_stats(self) -> dict[str, float]:
        """The engine's counters for /metrics (dsml_proxy_engine_*)."""
        return self.engine.stats()

    async def ready(self) -> bool:
        return True  # the weights are loaded before the backend exists

    async def close(self) -> None:
        self.engine.close()
