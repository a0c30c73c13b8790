"""The engine: a model, its weights and its tokenizer on one device, generating token streams.

    engine = Engine.from_checkpoint("DIR")            # cuda when present, else cpu
    async for token_id in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):
        ...
    async for step in engine.stream(prompt_ids, params):   # ids + stop-safe text + finish
        ...

Scheduling is simple continuous batching: a scheduler task prefills each new sequence on
its own (in chunks), then decodes every running sequence together, one token per step,
through the model's batch API (one `BatchState` row per sequence, at its own position); up
to `max_batch_size` run at once and the rest wait. Every forward runs on one worker thread,
so the event loop stays responsive and torch calls never interleave. Smarter policies
(batched prefill, paged KV) belong to the next issue.

Two decode paths, chosen by `engine_path` (the proxy's `--engine-path`):
  "auto"       the fast path on CUDA, the reference elsewhere (default);
  "fast"       the fast path on any device (eager on CPU: the tests use it);
  "reference"  `Transformer.forward` for every step, and every kernel on its PyTorch
               reference: the engine sets `engine.kernels.set_mode` ("reference" here,
               "auto" for the other two; process-wide).
The fast path keeps every sequence's state in one `engine.kv.SlotPool` (max_batch_size
slots of max_seq_len positions, allocated up front); prefill still runs through
`Transformer.forward`, writing the pool through the slot's views, and decode goes through
`engine.runner.DecodeRunner` (CUDA graphs per batch bucket, on-device sampling). Rows whose
sampling the graph cannot do (`graph_can_sample`: a seed with temperature > 0, a logits
mask, ...) are sampled from the graph's logits by their reference `Sampler`.

Prefix cache (`prefix_cache`, on by default; the fast path only, the reference path stays
the oracle): a sequence that ends leaves its slot cached with the ids its state consumed
(`engine.kv` explains the rule); a new prompt that starts with a cached sequence's ids
continues that slot and prefills only the rest. Only a state no forward is touching is
cached (a normal end, or a cancelled sequence dropped between steps); a failed forward or
a closed engine frees the slot instead. `stats()` returns the engine's counters as plain
numbers (the proxy's /metrics reads them).

A generation ends on EOS (id 1, unless `ignore_eos`), a stop token id, a stop string, or
`max_tokens` ("length"). EOS and stop token ids keep their text (the DSML parser reads
`<｜end▁of▁sentence｜>`); a stop string is cut from the text, and text that might be the
start of one is held back until the next token decides. Cancelling the consumer (or
`aclose()`) marks the sequence done: the scheduler drops it and its KV state before the
next step (a forward already running on the worker thread finishes first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsml.detokenizer import IncrementalDetokenizer
from dsml.tokenizer import V4Tokenizer, load_tokenizer
from engine import kernels
from engine.cache import BatchState, SequenceState
from engine.kv import SlotPool
from engine.kv_disk import DiskPrefixCache, DiskStats, model_fingerprint
from engine.model import Transformer
from engine.runner import DecodeRunner, graph_can_sample
from engine.sampling import Sampler, SamplingParams, TokenLogprobs
from engine.weights import load_model

DEFAULT_MAX_SEQ_LEN = 65536  # per sequence; KV state is allocated for prompt + max_tokens
PREFILL_CHUNK = 2048  # prompt tokens per forward: bounds activation memory, same logits
DEFAULT_MAX_BATCH_SIZE = 16  # sequences decoded together
ENGINE_PATHS = ("auto", "fast", "reference")

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token: its id, the text it releases, and why generation ended (or None)."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | None = None  # the stop string that ended it (None: EOS, stop id, length)
    logprobs: TokenLogprobs | None = None  # with SamplingParams.logprobs


class StopStrings:
    """Finds stop strings in streamed text; emits only text that cannot start one.

    Work per call is proportional to the new text plus the held-back tail (shorter than the
    longest stop string).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string ended it); `matched` names the string."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self._pending = ""
            # The earliest match cuts the text (the first listed wins a tie): that is the
            # one reported (vLLM's `stop_reason`; Anthropic's `stop_sequence`).
            cut, self.matched = min(hits, key=lambda hit: hit[0])
            return buf[:cut], True
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


@dataclass
class EngineCounters:
    """Cumulative engine counters (plain numbers, read from any thread)."""

    requests: int = 0  # sequences admitted to a prefill
    prompt_tokens: int = 0  # prompt tokens of those sequences
    prefill_tokens: int = 0  # prompt tokens actually run through the model
    generated_tokens: int = 0  # tokens sampled (prefill's first token included)
    decode_steps: int = 0
    decode_seconds: float = 0.0  # wall time of the decode forwards
    last_decode_tokens_per_second: float = 0.0  # rows of the last decode step / its time


@dataclass(eq=False)
class _Sequence:
    """One request's generation state, shared by its consumer and the scheduler."""

    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopStrings
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Step | BaseException
    ids: list[int] = field(default_factory=list)  # prompt + generated (what masks see)
    state: SequenceState | None = None
    done: bool = False  # finished, failed or cancelled: the scheduler drops it
    logprobs: TokenLogprobs | None = None  # of the token the worker sampled last


def prepare_masks(batch: Sequence[_Sequence]) -> None:
    """Let a mask class compute its masks of a batch together: one `prepare_batch(pairs)`
    call per class that has one, for two or more of its rows (a grammar mask fills them on
    llguidance's thread pool). A failure leaves each mask to compute its own row."""
    groups: dict[object, list[tuple[object, list[int]]]] = {}
    for seq in batch:
        mask = seq.params.logits_mask
        prepare = getattr(type(mask), "prepare_batch", None)
        if prepare is not None:
            groups.setdefault(prepare, []).append((mask, seq.ids))
    for prepare, pairs in groups.items():
        if len(pairs) > 1:
            try:
                prepare(pairs)
            except Exception:
                log.exception("batched mask preparation failed; masks run one by one")


class Engine:
    def __init__(self, model: Transformer, tokenizer: V4Tokenizer, device: torch.device | str,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, engine_path: str = "auto",
                 capture_graphs: bool = True, prefix_cache: bool = True,
                 prefix_cache_disk: str | Path | None = None,
                 prefix_cache_disk_bytes: int = 20 << 30) -> None:
        if engine_path not in ENGINE_PATHS:
            raise ValueError(f"engine_path must be one of {', '.join(ENGINE_PATHS)}, got {engine_path!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.eos_id = model.config.eos_token_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._closed = False
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._scheduler: asyncio.Task | None = None
        self.counters = EngineCounters()
        self.engine_path = engine_path
        # the one kernel switch follows the path (process-wide): the oracle uses no kernel
        kernels.set_mode("reference" if engine_path == "reference" else "auto")
        self._pool: SlotPool | None = None
        self._runner: DecodeRunner | None = None
        if engine_path == "fast" or (engine_path == "auto" and self.device.type == "cuda"):
            disk = None
            if prefix_cache and prefix_cache_disk is not None:
                disk = DiskPrefixCache(prefix_cache_disk, prefix_cache_disk_bytes,
                                       model_fingerprint(model.config, model.dtype))
            self._pool = SlotPool(model.config, max_batch_size, self.max_seq_len, self.device,
                                  model.dtype, prefix_cache=prefix_cache, disk=disk)
            self._runner = DecodeRunner(model, self._pool)
            if capture_graphs:
                self._runner.capture()
            if self.device.type == "cuda":
                self.warm_prefill()

    def warm_prefill(self) -> None:
        """One prefill chunk of a dummy prompt through a pool slot, at start: the prefill
        kernels compile and tune their tiles (engine/kernels/grouped_experts.py times its
        candidates on the first chunk of a size: about a minute of compiling on a fresh
        machine) before the first request, not during it. The slot is freed, not cached."""
        n = min(PREFILL_CHUNK, self.max_seq_len - 1)
        if self._pool is None or n < 1:
            return
        slot = self._pool.acquire()
        try:
            with torch.inference_mode():
                state = BatchState([self._pool.sequence_state(slot)])
                # varied ids: the tuner times a chunk whose tokens spread over the experts
                # like a real prompt's (one repeated id would send them all to six)
                g = torch.Generator().manual_seed(0)
                vocab = self.model.config.vocab_size
                tokens = torch.randint(0, vocab, (1, n), generator=g).to(self.device)
                self.model(tokens, state, last_only=True)
        finally:
            self._pool.release(slot)

    @property
    def fast_path(self) -> bool:
        return self._runner is not None

    @property
    def prefix_cache(self) -> bool:
        return self._pool is not None and self._pool.prefix_cache

    def stats(self) -> dict[str, float]:
        """The engine's gauges and counters as plain numbers (names without a prefix)."""
        pool = self._pool
        out: dict[str, float] = {
            "queue_depth": len(self._waiting),
            "running_sequences": len(self._running),
            "slots_total": pool.max_seqs if pool else self.max_batch_size,
            "slots_used": pool.num_in_use if pool else len(self._running),
            "slots_cached": pool.num_cached if pool else 0,
            **asdict(self.counters),
        }
        cache = asdict(pool.stats) if pool else {"hits": 0, "misses": 0, "evictions": 0,
                                                 "tokens_saved": 0}
        out.update({f"prefix_cache_{k}": v for k, v in cache.items()})
        disk = asdict(pool.disk.stats) if pool and pool.disk else asdict(DiskStats())
        out.update({f"prefix_cache_disk_{k}": v for k, v in disk.items()})
        out["prefix_cache_disk_bytes"] = pool.disk.nbytes if pool and pool.disk else 0
        return out

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.bfloat16, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                        progress: bool | None = None, engine_path: str = "auto",
                        **cache: Any) -> Engine:
        """Load `path` (official layout, see engine.weights) and its `tokenizer.json` if it has
        one (the package's V4 tokenizer otherwise). Blocking: seconds for a tiny checkpoint."""
        device = torch.device(device) if device is not None else default_device()
        model = load_model(path, device=device, dtype=dtype, progress=progress)
        tok_file = Path(path) / "tokenizer.json"
        tokenizer = V4Tokenizer(str(tok_file)) if tok_file.is_file() else load_tokenizer()
        return cls(model, tokenizer, device, max_seq_len, max_batch_size, engine_path, **cache)

    def close(self) -> None:
        """Stop the worker thread (a running forward finishes); later generations fail."""
        self._closed = True
        task = self._scheduler
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.cancel()
        for seq in [*self._waiting, *self._running]:
            if not seq.done:
                self._fail(seq, RuntimeError("engine is closed"))
        self._waiting.clear()
        self._running = []
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()  # the disk tier (if any) keeps the cached conversations

    def max_new_tokens(self, prompt_len: int) -> int:
        """Tokens a prompt of this length may still generate (the context left)."""
        return self.max_seq_len - prompt_len

    @property
    def num_running(self) -> int:
        return len(self._running)

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
        seq = _Sequence(prompt, sampling, Sampler(sampling, self.device),
                        IncrementalDetokenizer(self.tokenizer), StopStrings(sampling.stop),
                        ids=list(prompt))
        loop = asyncio.get_running_loop()
        if self._scheduler is not None and self._scheduler.get_loop() is not loop:
            # A new event loop (tests run one per test): sequences of the old one have no
            # consumer left to read them. Their pool slots come back (a forward of the old
            # loop still on the worker thread finishes before any new one starts there).
            for old in [*self._waiting, *self._running]:
                self._drop_state(old)
            self._waiting.clear()
            self._running = []
            self._scheduler = None
        self._waiting.append(seq)
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = loop.create_task(self._schedule(), name="engine-scheduler")
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Cancelled or closed early: the scheduler drops it (and its KV state) between
            # steps; the state itself is not touched here, a forward may be using it.
            seq.done = True

    # -- scheduler (event loop) --------------------------------------------------------------

    async def _schedule(self) -> None:
        """Admit and prefill waiting sequences, decode the running ones; exit when idle (a
        new request starts it again), so no task outlives its work or its event loop."""
        loop = asyncio.get_running_loop()
        while self._waiting or self._running:
            while self._waiting and len(self._running) < self.max_batch_size:
                seq = self._waiting.popleft()
                if seq.done:
                    continue
                try:
                    token = await loop.run_in_executor(self._executor, self._prefill, seq)
                except Exception as e:  # this sequence fails; the others go on
                    self._fail(seq, e)
                    continue
                self._accept(seq, token)
                if seq.done:  # finished at once, or cancelled during its prefill
                    self._drop_state(seq, keep=True)
                else:
                    self._running.append(seq)
            batch = [s for s in self._running if not s.done]
            if batch:
                try:
                    started = time.perf_counter()
                    tokens = await loop.run_in_executor(self._executor, self._decode, batch)
                    self._count_decode(len(batch), time.perf_counter() - started)
                except Exception as e:  # the forward itself failed: every row of it fails
                    tokens = [e] * len(batch)
                for seq, token in zip(batch, tokens, strict=True):
                    if isinstance(token, Exception):
                        self._fail(seq, token)
                    elif not seq.done:
                        self._accept(seq, token)
            for seq in self._running:
                if seq.done:  # no forward is running now: the state is whole, it may be cached
                    self._drop_state(seq, keep=True)
            self._running = [s for s in self._running if not s.done]

    def _fail(self, seq: _Sequence, error: Exception) -> None:
        seq.out.put_nowait(error)
        seq.done = True
        self._drop_state(seq)

    def _count_decode(self, rows: int, seconds: float) -> None:
        c = self.counters
        c.decode_steps += 1
        c.decode_seconds += seconds
        c.last_decode_tokens_per_second = rows / seconds if seconds > 0 else 0.0

    def _drop_state(self, seq: _Sequence, keep: bool = False) -> None:
        """Forget a sequence's KV state and give its pool slot back. `keep` (only where no
        forward can be running on it): the slot stays in the prefix cache with exactly the
        ids its state consumed; the last sampled token was never fed, hence `[:length]`."""
        state, seq.state = seq.state, None
        if state is not None and state.slot is not None and self._pool is not None:
            consumed = seq.ids[: state.length] if keep and state.length <= len(seq.ids) else None
            self._pool.release(state.slot, consumed)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record a sampled token and hand its Step to the consumer; end the sequence if due."""
        params = seq.params
        seq.ids.append(token)
        self.counters.generated_tokens += 1
        n = len(seq.ids) - len(seq.prompt)
        ends = (token == self.eos_id and not params.ignore_eos) or token in params.stop_token_ids
        last = ends or n == params.max_tokens
        text = seq.detok.push(token) + (seq.detok.flush() if last else "")
        text, stopped = seq.stops.feed(text)
        lp, seq.logprobs = seq.logprobs, None
        if stopped:
            step = Step(token, text, "stop", seq.stops.matched, lp)
        elif last:  # release what was held back for a stop string
            step = Step(token, text + seq.stops.flush(), "stop" if ends else "length", None, lp)
        else:
            step = Step(token, text, logprobs=lp)
        seq.out.put_nowait(step)
        if step.finish_reason is not None:
            seq.done = True
            self._drop_state(seq, keep=True)  # called between forwards: the state is whole

    # -- worker thread -----------------------------------------------------------------------

    def _prefill(self, seq: _Sequence) -> int:
        with torch.inference_mode():
            max_len = len(seq.prompt) + seq.params.max_tokens
            cached = 0
            if self._pool is not None:  # the fast path: the prefill writes the pool
                slot, cached = self._pool.acquire_prefix(seq.prompt)
                seq.state = self._pool.sequence_state(slot, max_len)
                seq.state.length = cached  # a hit: pool[slot] already holds prompt[:cached]
                state = BatchState([seq.state])
            else:
                state = self.model.new_state(1, max_len, self.device)
            c = self.counters
            c.requests += 1
            c.prompt_tokens += len(seq.prompt)
            c.prefill_tokens += len(seq.prompt) - cached
            for start in range(cached, len(seq.prompt), PREFILL_CHUNK):
                chunk = torch.tensor([seq.prompt[start : start + PREFILL_CHUNK]], device=self.device)
                logits = self.model(chunk, state, last_only=True)  # [1, V]
            seq.state = state.seqs[0]
            token = int(seq.sampler(logits[0], seq.ids))
            seq.logprobs = seq.sampler.take_logprobs()
            return token

    def _decode(self, batch: list[_Sequence]) -> list[int | Exception]:
        """One token for every sequence of `batch`, each at its own position; a row whose
        sampling fails (a mask that allows nothing) gets its exception instead."""
        with torch.inference_mode():
            graph_tokens = None
            if self._runner is not None:
                graph_tokens, logits = self._runner.decode(
                    [s.state for s in batch], [s.ids[-1] for s in batch], [s.params for s in batch])
            else:
                tokens = torch.tensor([[s.ids[-1]] for s in batch], device=self.device)  # [B, 1]
                state = BatchState([s.state for s in batch])
                logits = self.model(tokens, state, last_only=True)  # [B, V]
            prepare_masks(batch)  # while the GPU runs the step
            sampled: list[torch.Tensor | Exception] = []
            for b, seq in enumerate(batch):  # each row has its own params, seed and mask
                if graph_tokens is not None and graph_can_sample(seq.params):
                    sampled.append(graph_tokens[b])
                    continue
                try:
                    sampled.append(seq.sampler(logits[b], seq.ids))
                except Exception as e:
                    sampled.append(e)
            # The ids come back in one host sync, which the loop needs for EOS / stop strings.
            ok = [t for t in sampled if isinstance(t, torch.Tensor)]
            ids = iter(torch.stack(ok).tolist() if ok else [])
            for seq in batch:  # after the ids: one more sync, only for rows that ask
                seq.logprobs = seq.sampler.take_logprobs()
            return [t if isinstance(t, Exception) else next(ids) for t in sampled]
