"""The embedded backend: DeepSeek-V4-Flash running in this process (engine.runtime.Engine).

`dsml-proxy serve --model DIR` (and `--demo`, on a tiny random checkpoint) serve through it.
It speaks the same Backend protocol as the upstream servers: prompt ids in (text only as a
fallback, tokenized as model output would be), text deltas out with special tokens kept,
cancellable. The engine does the detokenisation and stop-string handling; this file only
translates the proxy's sampling options and merges token steps into deltas.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from engine.runtime import Engine
from engine.sampling import SamplingParams as EngineSampling
from proxy.backends.base import GenerateDelta, GenerateRequest, SamplingParams
from proxy.errors import ApiError

# DeepSeek's API defaults, used when a request leaves an option unset.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


class EmbeddedBackend:
    name = "embedded"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> EmbeddedBackend:
        """Load a checkpoint directory (blocking: seconds for the demo, minutes for the real model)."""
        return cls(Engine.from_checkpoint(path, device=device))

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
            logits_mask=mask,
        )

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
        pending = 0  # tokens whose text is still held back (a split UTF-8 char, a stop prefix)
        async for step in self.engine.stream(prompt_ids, sampling):
            pending += 1
            if step.text or step.finish_reason is not None:
                yield GenerateDelta(text=step.text, num_tokens=pending,
                                    finish_reason=step.finish_reason, stop_reason=step.stop_reason)
                pending = 0

    async def ready(self) -> bool:
        return True  # the weights are loaded before the backend exists

    async def close(self) -> None:
        self.engine.close()
