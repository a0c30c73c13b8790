"""The engine: a model, its weights and its tokenizer on one device, generating token streams.

    engine = Engine.from_checkpoint("DIR")            # cuda when present, else cpu
    async for token_id in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):
        ...
    async for step in engine.stream(prompt_ids, params):   # ids + stop-safe text + finish
        ...

Scheduling is deliberately simple for now: one sequence at a time (an asyncio lock), its
prompt prefilled in chunks, then one token per step. Every forward runs on one worker
thread, so the event loop stays responsive and torch calls never interleave; batching many
sequences through the model's batch API is the next issue's job.

A generation ends on EOS (id 1, unless `ignore_eos`), a stop token id, a stop string, or
`max_tokens` ("length"). EOS and stop token ids keep their text (the DSML parser reads
`<｜end▁of▁sentence｜>`); a stop string is cut from the text, and text that might be the
start of one is held back until the next token decides. Cancelling the consumer (or
`aclose()`) stops at the next step and drops the sequence's KV state with the generator; a
forward already running on the worker thread finishes first, and the next sequence queues
behind it on the same thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from dsml.detokenizer import IncrementalDetokenizer
from dsml.tokenizer import V4Tokenizer, load_tokenizer
from engine.cache import BatchState
from engine.model import Transformer
from engine.sampling import Sampler, SamplingParams
from engine.weights import load_model

DEFAULT_MAX_SEQ_LEN = 65536  # per sequence; KV state is allocated for prompt + max_tokens
PREFILL_CHUNK = 2048  # prompt tokens per forward: bounds activation memory, same logits


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token: its id, the text it releases, and why generation ended (or None)."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length"


class StopStrings:
    """Finds stop strings in streamed text; emits only text that cannot start one.

    Work per call is proportional to the new text plus the held-back tail (shorter than the
    longest stop string).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string ended it)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [i for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        keep = 0
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Engine:
    def __init__(self, model: Transformer, tokenizer: V4Tokenizer, device: torch.device | str,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.eos_id = model.config.eos_token_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.bfloat16, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                        progress: bool | None = None) -> Engine:
        """Load `path` (official layout, see engine.weights) and its `tokenizer.json` if it has
        one (the package's V4 tokenizer otherwise). Blocking: seconds for a tiny checkpoint."""
        device = torch.device(device) if device is not None else default_device()
        model = load_model(path, device=device, dtype=dtype, progress=progress)
        tok_file = Path(path) / "tokenizer.json"
        tokenizer = V4Tokenizer(str(tok_file)) if tok_file.is_file() else load_tokenizer()
        return cls(model, tokenizer, device, max_seq_len)

    def close(self) -> None:
        """Stop the worker thread (a running forward finishes); later generations fail."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def max_new_tokens(self, prompt_len: int) -> int:
        """Tokens a prompt of this length may still generate (the context left)."""
        return self.max_seq_len - prompt_len

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> AsyncIterator[int]:
        """Generated token ids, ending as `stream` does."""
        async for step in self.stream(prompt_ids, sampling):
            yield step.token_id

    async def stream(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> AsyncIterator[Step]:
        """Generated tokens with their stop-safe text; the last Step has a finish_reason."""
        if self._closed:
            raise RuntimeError("engine is closed")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt_ids must be in 0..{vocab - 1}")
        if len(prompt) + sampling.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) "
                             f"exceeds the engine's max_seq_len {self.max_seq_len}")
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:  # an asyncio.Lock belongs to one event loop
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            sampler = Sampler(sampling, self.device)
            state = await loop.run_in_executor(
                self._executor, self.model.new_state, 1, len(prompt) + sampling.max_tokens, self.device)
            detok = IncrementalDetokenizer(self.tokenizer)
            stops = StopStrings(sampling.stop)
            ids = list(prompt)
            token = await loop.run_in_executor(self._executor, self._prefill, state, prompt, sampler)
            for n in range(1, sampling.max_tokens + 1):
                ids.append(token)
                ends = (token == self.eos_id and not sampling.ignore_eos) or token in sampling.stop_token_ids
                text = detok.push(token) + (detok.flush() if ends or n == sampling.max_tokens else "")
                text, stopped = stops.feed(text)
                if stopped or ends:
                    yield Step(token, text, "stop")
                    return
                if n == sampling.max_tokens:
                    yield Step(token, text + stops.flush(), "length")
                    return
                yield Step(token, text)
                token = await loop.run_in_executor(self._executor, self._decode, state, token, ids,
                                                   sampler)

    # -- worker thread ---------------------------------------------------------------------

    def _prefill(self, state: BatchState, prompt: list[int], sampler: Sampler) -> int:
        with torch.inference_mode():
            for start in range(0, len(prompt), PREFILL_CHUNK):
                chunk = torch.tensor([prompt[start : start + PREFILL_CHUNK]], device=self.device)
                logits = self.model(chunk, state, last_only=True)  # [1, V]
            return int(sampler(logits[0], prompt))

    def _decode(self, state: BatchState, token: int, ids: list[int], sampler: Sampler) -> int:
        with torch.inference_mode():
            logits = self.model(torch.tensor([[token]], device=self.device), state, last_only=True)
            # The id goes back to the host here: the loop needs it for EOS / stop strings.
            return int(sampler(logits[0], ids))
