"""The turn runner: one assistant turn, whatever the endpoint and whatever the backend.

    Prompt (dsml.render_chat) -> token ids -> Backend.generate -> dsml.StreamParser -> events

Endpoints (chat completions now; Anthropic messages and Responses later) translate their
request into a `Prompt` + `SamplingParams`, iterate `Turn.events()`, and encode each event;
after the iteration `Turn.result`, the token counts and `Turn.finish_reason` are final.

What the runner adds on top of the parser (dsml.md section 6 does the rest):

- Forced tool choice. The model cannot be told "you must call a tool", so the turn is
  continued with the tool block opener (and `<｜DSML｜invoke name="…">` for a named tool), fed
  to the parser as if the model wrote it. In thinking mode the reasoning is generated first,
  up to `</think>` (a stop string), then the turn continues after `</think>` + the opener.
- `parallel_tool_calls: false`: generation stops after the first complete invoke.
- Empty-turn recovery: a thinking turn that ends inside reasoning, with no answer and no
  call, is continued once after an appended `</think>` (TurnOutcome.RECOVERED_EMPTY).
- Reasoning produced for tool calls is remembered by call id (`ReasoningCache`).
- Cut calls (api.md "Cut calls"): a call the output cut off stays what the client saw of
  it (`Turn.cut_call`, its arguments the fragments the model wrote); the parser's copy of
  the cut block's text as content is dropped, the finish reason is `length` and the
  outcome `truncated`. A turn the engine ended with `stop` and no stop string ended at EOS
  (vLLM and SGLang do not send EOS's text), which the parser is told.

The dialect (dsml.md section 2) of the request's model decides the forced opener's tag
spelling, the parser's native tags and how the prompt travels: as token ids where the V4
tokenizer is the model's (v4, v4-0731), as text otherwise (see `sends_ids`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

from dsml.dialects import Dialect, texts
from dsml.errors import DsmlError, UnsupportedError
from dsml.events import (
    CallOutcome,
    ContentDelta,
    Event,
    ParseResult,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnOutcome,
)
from dsml.markers import DSML, EOS, THINK_CLOSE
from dsml.parser import StreamParser
from dsml.prompt import Prompt
from dsml.tokenizer import V4Tokenizer
from proxy.backends.base import (
    Backend,
    BackendError,
    GenerateDelta,
    GenerateRequest,
    SamplingParams,
    TokenLogprob,
)
from proxy.backends.constraints import Mode, TurnConstraints
from proxy.errors import ApiError
from proxy.logprobs import LogprobAligner
from proxy.metrics import Metrics, TurnObserver
from proxy.reasoning_cache import ReasoningCache
from proxy.timing import RequestClock

log = logging.getLogger("dsml_proxy.backend")


def forced_block(dialect: Dialect | str = Dialect.V4) -> str:
    """What the model writes before its first invoke: `\\n\\n<｜DSML｜tool_calls>\\n` in v4 and
    v4-0731, `<｜DSML｜ calls>` in v4.1, `<｜DSML｜function_calls>` in v3.2 (dsml.md 2, 5)."""
    return f"\n\n<{DSML}{texts(dialect).block_tag}>\n"


def block_close(dialect: Dialect | str = Dialect.V4) -> str:
    return f"</{DSML}{texts(dialect).block_tag}>"


FORCED_BLOCK = forced_block(Dialect.V4)
# End of an invoke in any tolerated spelling: `</｜DSML｜invoke>`, `</｜DSML｜ invoke>`,
# `</|DSML|invoke>`, `.../>`.
_INVOKE_END = re.compile(r"invoke\s*>|/>")
# Dialects whose model reads the V4 tokenizer's ids (dsml.tokenizer). V4.1 has a
# `<｜System｜>` token the V4 vocabulary lacks, and V3.2 has its own tokenizer (its think
# tokens have other ids): their prompts go to the engine as text, tokenized by the engine
# with the model's own tokenizer.
V4_TOKENIZER_DIALECTS = frozenset({Dialect.V4, Dialect.V4_0731})


def sends_ids(dialect: Dialect | str) -> bool:
    """Whether a turn in this dialect sends the backend token ids (else only the text)."""
    return Dialect(dialect) in V4_TOKENIZER_DIALECTS


def count_prompt_tokens(tokenizer: V4Tokenizer, prompt: Prompt) -> int:
    """The prompt's length in tokens. Exact where the tokenizer knows every control string of
    the prompt; a control string it lacks (v4.1's `<｜System｜>`) counts as the one token it
    is in the dialect's own vocabulary, the rest is counted with the V4 tokenizer."""
    try:
        return len(tokenizer.encode_prompt(prompt))
    except UnsupportedError:
        known = [s for s in prompt.segments if not s.control or s.text in tokenizer.control_ids]
        unknown = len(prompt.segments) - len(known)
        return len(tokenizer.encode_prompt(Prompt(known))) + unknown


def observe_many(histogram: Any, value: float, n: int) -> None:
    """`histogram.observe(value)` n times, at the cost of one (an unlabelled Histogram)."""
    if n == 1:
        histogram.observe(value)
        return
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum
    except AttributeError:  # another prometheus_client layout: the plain way
        for _ in range(n):
            histogram.observe(value)
        return
    total.inc(value * n)
    buckets[bisect_left(bounds, value)].inc(n)  # the first bucket with value <= bound


def unparsable(exc: Exception) -> ApiError:
    """A parser failure on the model's output (a parser bug): a 502 in the API's error shape
    (the model's output, not the request, is at fault), never a 500; the traceback is logged."""
    log.error("the DSML parser failed on the model's output", exc_info=exc)
    return ApiError(502, f"the model's output could not be parsed ({type(exc).__name__})",
                    code="unparsable_output")


def forced_opener(prompt: Prompt, dialect: Dialect | str = Dialect.V4) -> str:
    """The text that forces the prompt's tool choice, "" when the model may choose."""
    if not prompt.tools:
        return ""
    block = forced_block(dialect)
    choice: Any = prompt.tool_choice
    if choice == "required":
        return block
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools":
            mode = (choice.get("allowed_tools") or {}).get("mode")
            return block if mode == "required" else ""
        name = (choice.get("function") or {}).get("name")
        if name:
            return block + f'<{DSML}{texts(dialect).invoke_tag} name="{name}">\n'
    return ""


class TurnRunner:
    """Shared by every request of one app: the backend, tokenizer, metrics and policy."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: V4Tokenizer,
        metrics: Metrics,
        *,
        reasoning_cache: ReasoningCache,
        recover_empty_turns: bool = True,
        strict_tool_calls: bool = False,
        dialect: Dialect | str = Dialect.V4,
        constrained_decoding: Mode = "off",
    ) -> None:
        self.backend = backend
        self.dialect = Dialect(dialect)  # of turns started without one
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.reasoning_cache = reasoning_cache
        self.recover_empty_turns = recover_empty_turns
        self.strict_tool_calls = strict_tool_calls
        self.constraints = TurnConstraints(constrained_decoding)

    def start(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        endpoint: str,
        clock: RequestClock,
        parallel_tool_calls: bool = True,
        dialect: Dialect | str | None = None,
    ) -> Turn:
        """`dialect`: the one that rendered `prompt` (the request's model's)."""
        return Turn(self, prompt, sampling, endpoint=endpoint, clock=clock,
                    parallel_tool_calls=parallel_tool_calls,
                    dialect=self.dialect if dialect is None else Dialect(dialect))

    async def deltas(
        self, req: GenerateRequest, *, endpoint: str, clock: RequestClock
    ) -> AsyncIterator[GenerateDelta]:
        """The backend's deltas, timed: waits excluded from overhead, TTFT, inter-token latency,
        upstream errors counted. Closing this iterator closes the backend stream at once.

        A delta may cover many tokens (the upstream backend merges what one read holds).
        Inter-token latency stays per token: a delta of n tokens, t after the previous one,
        counts as n latencies of t/n (n-1 zeros for the first delta), at the cost of one
        observation per delta."""
        metrics = self.metrics
        last_at: float | None = None
        try:
            async with aclosing(self.backend.generate(req)) as stream:
                while True:
                    clock.wait_begin()
                    try:
                        delta = await anext(stream)
                    except StopAsyncIteration:
                        clock.wait_end()
                        return
                    now = clock.wait_end()
                    if delta.text:  # not the usage corrections (text "", late token counts)
                        num = delta.num_tokens
                        if clock.first_token_at is None:
                            clock.first_token_at = now
                            metrics.ttft_of[endpoint].observe(now - clock.started)
                            if num > 1:  # the first token's companions came with it
                                observe_many(metrics.itl, 0.0, num - 1)
                        elif last_at is not None:
                            observe_many(metrics.itl, (now - last_at) / max(1, num), max(1, num))
                        last_at = now
                    yield delta
        except BackendError as exc:
            metrics.upstream_errors.labels(exc.reason).inc()
            # The client's error says what failed, not where: the engine's text goes here.
            log.warning("upstream error", extra={"fields": {
                "reason": exc.reason, "status": exc.status, "message": exc.message,
                "detail": exc.detail}})
            raise


class Turn:
    def __init__(
        self,
        runner: TurnRunner,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        endpoint: str,
        clock: RequestClock,
        parallel_tool_calls: bool,
        dialect: Dialect = Dialect.V4,
    ) -> None:
        self._runner = runner
        self.prompt = prompt
        self.dialect = dialect
        self._send_ids = sends_ids(dialect)
        self.sampling = sampling
        self.endpoint = endpoint
        self._clock = clock
        self.parallel_tool_calls = parallel_tool_calls
        self._observer = TurnObserver(runner.metrics, endpoint)
        self._parser: Any = None
        self._prompt_ids: list[int] = []
        self._prompt_json = "[]"  # _prompt_ids as a JSON array
        self._tokenized = False  # see tokenize
        self._generated: list[str] = []  # model-side text after the prompt (forced text included)
        # The same text as pieces for a continuation's prompt ids (see _continuation_ids):
        # (text, the engine's ids of it or None, whether the proxy wrote it).
        self._pieces: list[tuple[str, list[int] | None, bool]] = []
        self._phases = 0  # generations run so far
        self._in_reasoning = prompt.thinking
        self._saw_think_close = False
        self._saw_eos = False
        self._backend_finish: str | None = None
        self._backend_stop: str | None = None  # the stop string the backend says ended it
        self._own_stop = False  # the last generation ended at the proxy's own `</think>` stop
        self._num_calls_started = 0
        self._first_call_done = False
        self._any_event = False  # the turn produced an event
        self._started = False  # the engine's first token arrived (see batches)
        self._stopped_after_first_call = False
        self._open_call: ToolCallStart | None = None  # the call being streamed, and
        self._open_frags: list[str] = []  # its argument fragments so far
        self._cut_text: list[str] = []  # the parser's copy of a cut block, not delivered
        # The call the output cut off, as the client saw it (None if none was cut).
        self.cut_call: ToolCall | None = None
        # Final figures, valid once events() is exhausted.
        self.result: ParseResult | None = None
        self.finish_reason = "stop"
        # The client's stop string that ended the turn (finish_reason "stop"); None on EOS,
        # and where the backend does not say which stop string matched.
        self.stop_sequence: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.recovered_empty = False
        # With sampling.logprobs: matches token logprobs to content (proxy.logprobs);
        # `logprobs.content` is the whole turn's, for a non-streamed response.
        self.logprobs = LogprobAligner() if sampling.logprobs is not None else None

    @property
    def calls(self) -> list[ToolCall]:
        """The calls the client is shown: the whole ones, then the cut one (whose
        `arguments_json` does not parse)."""
        assert self.result is not None
        calls = self.result.tool_calls
        return calls if self.cut_call is None else [*calls, self.cut_call]
        self.constrained = False  # a generation of this turn ran under a grammar

    # -- the turn -----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        async with aclosing(self.batches()) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    def tokenize(self) -> None:
        """The prompt's ids (or, for a prompt that goes as text, its length), once. The turn
        does it when it starts; an endpoint calls it before, on a worker thread, for a big
        prompt (proxy.routes.common.prepare_turn)."""
        if self._tokenized:
            return
        tokenizer = self._runner.tokenizer
        if self._send_ids:
            self._prompt_ids, self._prompt_json = tokenizer.encode_prompt_json(self.prompt)
            self.prompt_tokens = len(self._prompt_ids)
        else:
            self.prompt_tokens = count_prompt_tokens(tokenizer, self.prompt)
        self._tokenized = True

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The turn's events, in lists: those of one backend delta together, so that an
        endpoint can write them out at once. Never empty but once: when the engine's first
        token arrives and the parser holds it (a turn that opens with a tool call needs
        ~15 tokens before its first event, the call's name), an empty list says the
        generation has started, so the stream can open now (a chat stream's first chunk,
        with the role, as OpenAI sends it) instead of after those tokens."""
        runner, prompt = self._runner, self.prompt
        self.tokenize()
        self._parser = self._new_parser(thinking=prompt.thinking,
                                        strict=runner.strict_tool_calls)
        user_stop = list(self.sampling.stop)
        forced = forced_opener(prompt, self.dialect)
        if forced and prompt.thinking:
            async for batch in self._generate(stop=[THINK_CLOSE]):
                yield batch
            self._backend_stop = None  # our own `</think>` stop, never the client's
            self._own_stop = True  # nor an EOS (see _ended_at_eos)
            if self._backend_finish != "length" and not self._num_calls_started:
                self._saw_eos = False  # an EOS inside reasoning: force the call all the same
                if batch := self._inject(("" if self._saw_think_close else THINK_CLOSE) + forced):
                    yield batch
                async for batch in self._generate(stop=user_stop):
                    yield batch
        else:
            # in_prompt: the renderer already ended the prompt with the opener.
            if forced and (batch := self._inject(forced,
                                                 in_prompt=prompt.text.endswith(forced))):
                yield batch
            async for batch in self._generate(stop=user_stop):
                yield batch
            if self._should_recover_empty():
                self.recovered_empty = True
                self._saw_eos = False
                if batch := self._inject(THINK_CLOSE):
                    yield batch
                async for batch in self._generate(stop=user_stop):
                    yield batch
        if self._stopped_after_first_call:
            if batch := self._close_block():
                yield batch
        elif (self._saw_eos or self._ended_at_eos()) and (batch := self._settle(EOS)):
            yield batch
        if batch := self._settle(None):
            yield batch
        self._finish_turn()

    async def _generate(self, *, stop: list[str]) -> AsyncIterator[list[Event]]:
        if self._saw_eos or self._stopped_after_first_call:
            return
        sampling = dataclasses.replace(self.sampling, stop=stop)
        if sampling.max_tokens is not None:
            sampling.max_tokens -= self.completion_tokens  # max_completion_tokens spans phases
            if sampling.max_tokens <= 0:
                self._backend_finish = "length"
                return
        generated = "".join(self._generated)
        prompt_ids = ids_json = None
        if self._send_ids:
            more = self._continuation_ids() if generated else []
            prompt_ids = self._prompt_ids + more
            if not more:
                ids_json = self._prompt_json
            elif self._prompt_ids:  # the prompt's array, extended
                ids_json = self._prompt_json[:-1] + "," + ",".join(map(str, more)) + "]"
        # Only a first generation in thinking mode may be continued: the ids that come with
        # its deltas are kept. A forced tool choice always continues it, so it asks an
        # upstream for them; an empty-turn recovery (rare) does not: vLLM echoes the
        # prompt's ids in the first event with them, and plain BPE is as safe
        # (_continuation_ids). The embedded engine always gives them.
        continuable = self._send_ids and self._phases == 0 and self.prompt.thinking
        ask_ids = continuable and bool(forced_opener(self.prompt, self.dialect))
        self._phases += 1
        grammar = self._runner.constraints.grammar(
            self.prompt, generated, forced=forced_opener(self.prompt, self.dialect),
            dialect=self.dialect, parallel_tool_calls=self.parallel_tool_calls)
        if grammar is not None:
            self.constrained = True
            self._observer.constrained = "true"
        req = GenerateRequest(
            prompt_ids=prompt_ids,
            prompt_text=self.prompt.text + generated,
            sampling=sampling,
            prompt_ids_json=ids_json,
            return_token_ids=ask_ids,
            grammar=grammar,
        )
        phase_texts: list[str] = []
        phase_ids: list[int] | None = [] if continuable else None
        self._backend_finish = self._backend_stop = None
        self._own_stop = False
        async with aclosing(
            self._runner.deltas(req, endpoint=self.endpoint, clock=self._clock)
        ) as deltas:
            async for merged in deltas:
                if phase_ids is not None:
                    if merged.token_ids is not None:
                        phase_ids += merged.token_ids
                    elif merged.text:
                        phase_ids = None  # this engine does not say: see _continuation_ids
                for delta in self._steps(merged):
                    self.completion_tokens += delta.num_tokens
                    if self._in_reasoning:
                        self.reasoning_tokens += delta.num_tokens
                    if delta.finish_reason is not None:
                        self._backend_finish = delta.finish_reason
                        self._backend_stop = delta.stop_reason
                    text = delta.text
                    if not text or self._saw_eos:
                        continue  # keep reading: a usage correction may still come
                    # Reasoning tokens, `</think>` included, carry no logprobs (proxy.logprobs).
                    logprobs = None if self._in_reasoning else delta.logprobs
                    cut = text.find(EOS)
                    if cut >= 0:
                        logprobs = logprobs[:-1] if logprobs else None  # EOS's: not content
                        # Nothing follows EOS. It is held back (fed just before finish) so that
                        # a recovery continuation can still append `</think>`.
                        text = text[:cut]
                        self._saw_eos = True
                    if THINK_CLOSE in text:
                        self._in_reasoning = False
                        self._saw_think_close = True
                    self._generated.append(text)
                    phase_texts.append(text)
                    if batch := self._feed(text, logprobs):
                        yield batch
                    elif not self._started:
                        yield []
                    self._started = True
                    if self._first_call_done and not self.parallel_tool_calls:
                        self._stopped_after_first_call = True
                        break
                if self._stopped_after_first_call:
                    break  # closing `deltas` cancels the backend request
        if phase_texts or phase_ids:
            self._pieces.append(("".join(phase_texts), phase_ids, False))

    def _steps(self, delta: GenerateDelta) -> Iterator[GenerateDelta]:
        """A delta, or the tokens it merges (`parts`: the upstream backend merges what one
        read holds), one by one:

        - with parallel_tool_calls false until the first call is complete, so that
          generation stops, and tokens stop being counted, right after the first invoke;
        - until the turn's first event, so that the client's first chunk waits for no more
          tokens than it needs (then the rest of the delta goes on as one step).
        """
        parts = getattr(delta, "parts", None)
        if not parts or len(parts) < 2:
            yield delta
            return
        per_token = ((not self.parallel_tool_calls and not self._first_call_done)
                     or self.logprobs is not None)  # logprobs: matched to content per token
        part_logprobs = getattr(delta, "part_logprobs", None)
        if not per_token and self._any_event:
            yield delta
            return
        rest = delta.num_tokens - len(parts)  # the engine's usage correction, if any
        for k, part in enumerate(parts):
            if not per_token and self._any_event:
                # The first event went out: the rest of the delta in one step.
                yield GenerateDelta("".join(parts[k:]), len(parts) - k + max(0, rest),
                                    delta.finish_reason, delta.stop_reason)
                return
            last = k == len(parts) - 1 and rest <= 0
            yield GenerateDelta(part, 1, delta.finish_reason if last else None,
                                delta.stop_reason if last else None,
                                part_logprobs[k] if part_logprobs else None)
        if rest > 0:
            yield GenerateDelta("", rest, delta.finish_reason, delta.stop_reason)

    def _inject(self, text: str, *, in_prompt: bool = False) -> list[Event]:
        """Text the model is made to have written: fed to the parser, appended to the prompt."""
        if not in_prompt:
            self._generated.append(text)
            self._pieces.append((text, None, True))
        if THINK_CLOSE in text:
            self._in_reasoning = False
            self._saw_think_close = True
        return self._feed(text)

    def _continuation_ids(self) -> list[int]:
        """The ids of the model-side text so far, for the prompt of a continuation.

        Never the engine's text re-tokenized with control tokens matched: a model that
        writes the characters `<｜User｜>` (echoing a document) would inject a real user
        turn. In order of preference, per piece:

        - the proxy's own text (`</think>`, the forced opener): control strings matched;
        - the engine's ids of a generation (vLLM, SGLang: `return_token_ids`, asked for by a
          forced tool choice; the embedded engine always), less the EOS or `</think>` that ended it but is not in its text (a
          stop string is cut from the text, not from the ids); used only when they decode
          to the text exactly;
        - otherwise the text as plain BPE, with only the `</think>` the parser took as the
          end of reasoning as a control token (no call had started: a continuation only
          follows a generation without one, so no other markup is in it).
        """
        tokenizer = self._runner.tokenizer
        ids: list[int] = []
        in_reasoning = self.prompt.thinking
        for text, piece_ids, ours in self._pieces:
            if ours:
                ids += tokenizer.encode_generated(text)
            elif piece_ids is not None and (exact := self._engine_ids(text, piece_ids)):
                ids += exact
            elif in_reasoning and THINK_CLOSE in text:
                head, _, tail = text.partition(THINK_CLOSE)
                ids += tokenizer.encode_text(head)
                ids.append(tokenizer.control_ids[THINK_CLOSE])
                ids += tokenizer.encode_text(tail)
            else:
                ids += tokenizer.encode_text(text)
            if THINK_CLOSE in text:
                in_reasoning = False
        return ids

    def _engine_ids(self, text: str, ids: list[int]) -> list[int] | None:
        """`ids` (the engine's, of a generation whose text is `text`) less a trailing EOS or
        `</think>` that the text lacks; None unless they decode to `text` exactly."""
        tokenizer = self._runner.tokenizer
        ids = list(ids)
        for marker in (EOS, THINK_CLOSE):
            if ids and ids[-1] == tokenizer.control_ids[marker] and not text.endswith(marker):
                ids.pop()
        if not all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids):
            return None
        return ids if tokenizer.decode(ids) == text else None

    def _new_parser(self, *, thinking: bool, strict: bool = False) -> Any:
        # The rendering dialect's own tags are native to the parser, not repairs.
        return StreamParser(tools=self.prompt.tools, thinking=thinking, strict=strict,
                                 dialect=self.dialect)

    def _parse(self, text: str | None) -> list[Event]:
        """The parser's events for `text` (None: finish). The parser must never raise; if it
        does, the turn fails as unparsable model output (a 502), not as a server error."""
        try:
            return self._parser.finish() if text is None else self._parser.feed(text)
        except DsmlError:
            raise
        except Exception as exc:
            raise unparsable(exc) from exc

    def _feed(self, text: str, logprobs: list[TokenLogprob] | None = None) -> list[Event]:
        return self._filter(self._parse(text), logprobs)

    def _ended_at_eos(self) -> bool:
        """The engine said `stop` without a stop string: EOS, whose text vLLM and SGLang
        leave out. With client stop strings a backend that does not say which matched
        (llama.cpp, ds4) is ambiguous: not EOS then (a cut call stays cut)."""
        return (self._backend_finish == "stop" and self._backend_stop is None
                and not self._own_stop and not self.sampling.stop)

    def _settle(self, eos: str | None) -> list[Event]:
        """The turn's last events (EOS fed, or the parser finished). After a cut call, the
        parser returns the cut block's text as content (dsml.md: nothing is lost); the
        client saw that text as the call already, so it is not repeated."""
        events = self._filter(self._parse(eos or None))
        if self.cut_call is None:
            return events
        cut_at = next((i for i, e in enumerate(events) if isinstance(e, ToolCallEnd)
                       and e.outcome is CallOutcome.TRUNCATED), 0)
        kept = events[:cut_at]
        for event in events[cut_at:]:
            if isinstance(event, ContentDelta):
                self._cut_text.append(event.text)
            else:
                kept.append(event)
        return kept

    def _filter(self, events: list[Event],
                logprobs: list[TokenLogprob] | None = None) -> list[Event]:
        out = []
        for event in events:
            if isinstance(event, ToolCallStart | ToolCallArgsDelta | ToolCallEnd):
                if not self.parallel_tool_calls and event.index > 0:
                    continue  # parallel_tool_calls=false: only the first call is delivered
                if isinstance(event, ToolCallArgsDelta):
                    self._open_frags.append(event.fragment)
                elif isinstance(event, ToolCallStart):
                    self._num_calls_started += 1
                    self._open_call, self._open_frags = event, []
                else:
                    if event.index == 0:
                        self._first_call_done = True
                    if event.outcome is CallOutcome.TRUNCATED and self._open_call is not None:
                        start = self._open_call
                        self.cut_call = ToolCall(start.id, start.name, event.arguments,
                                                 "".join(self._open_frags), event.outcome,
                                                 event.error)
                    self._open_call = None
            self._observer.on_event(event)
            out.append(event)
        if self.logprobs is not None:
            out = self.logprobs.attach(logprobs, out)
        if out:
            self._any_event = True
        return out

    def _close_block(self) -> list[Event]:
        # Generation was cut right after the first invoke closer: close the block the way the
        # model would have, so the parser ends cleanly instead of reporting a truncated block.
        generated = "".join(self._generated)
        ends = list(_INVOKE_END.finditer(generated))
        tail = generated[ends[-1].end():] if ends else generated
        if tail.strip():
            return []  # something else had started; the parser's end-of-stream rules apply
        return self._feed(("" if tail.endswith("\n") else "\n") + block_close(self.dialect))

    def _should_recover_empty(self) -> bool:
        if not (
            self._runner.recover_empty_turns
            and self.prompt.thinking
            and not self._saw_think_close
            and not self._num_calls_started
            and self._backend_finish == "stop"
            # A user stop string may have ended the turn on purpose: only an EOS says the
            # model itself gave up inside reasoning.
            and (not self.sampling.stop or self._saw_eos)
        ):
            return False
        # A tool block written inside reasoning is only decided at the end of the stream
        # (dsml.md section 6), so ask a throwaway parser how this turn would end. This runs
        # once, only for turns that never left reasoning.
        probe = self._new_parser(thinking=True)
        try:
            probe.feed("".join(self._generated))
            probe.finish()
        except DsmlError:
            raise
        except Exception as exc:
            raise unparsable(exc) from exc
        return not probe.result.tool_calls

    def _finish_turn(self) -> None:
        result: ParseResult = self._parser.result
        if not self.parallel_tool_calls:
            del result.tool_calls[1:]
        if self.recovered_empty and result.turn_outcome is not None and (
            result.tool_calls or result.content.strip()
        ):
            result.turn_outcome = TurnOutcome.RECOVERED_EMPTY
        if self.cut_call is not None:
            cut = "".join(self._cut_text)
            if cut and result.content.endswith(cut):
                result.content = result.content[: len(result.content) - len(cut)]
            if result.turn_outcome is not None:
                result.turn_outcome = TurnOutcome.TRUNCATED
            self.finish_reason = "length"
        elif result.tool_calls:
            self.finish_reason = "tool_calls"
            cache = self._runner.reasoning_cache
            for call in result.tool_calls:
                cache.put(call.id, result.reasoning_content)
        else:
            self.finish_reason = "length" if self._backend_finish == "length" else "stop"
            if self.finish_reason == "stop" and self._backend_stop in self.sampling.stop:
                self.stop_sequence = self._backend_stop
        self.result = result
        self._observer.on_turn(
            result,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )
