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

The dialect (dsml.md section 2) of the request's model decides the forced opener's tag
spelling, the parser's native tags and how the prompt travels: as token ids where the V4
tokenizer is the model's (v4, v4-0731), as text otherwise (see `sends_ids`).
"""

from __future__ import annotations

import dataclasses
import re
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

from dsml.dialects import Dialect, texts
from dsml.errors import UnsupportedError
from dsml.events import (
    Event,
    ParseResult,
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
)
from proxy.backends.constraints import Mode, TurnConstraints
from proxy.metrics import Metrics, TurnObserver
from proxy.reasoning_cache import ReasoningCache
from proxy.timing import RequestClock


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
        self._generated: list[str] = []  # model-side text after the prompt (forced text included)
        self._in_reasoning = prompt.thinking
        self._saw_think_close = False
        self._saw_eos = False
        self._backend_finish: str | None = None
        self._backend_stop: str | None = None  # the stop string the backend says ended it
        self._num_calls_started = 0
        self._first_call_done = False
        self._any_event = False  # the turn produced an event
        self._started = False  # the engine's first token arrived (see batches)
        self._stopped_after_first_call = False
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
        self.constrained = False  # a generation of this turn ran under a grammar

    # -- the turn -----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        async with aclosing(self.batches()) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The turn's events, in lists: those of one backend delta together, so that an
        endpoint can write them out at once. Never empty but once: when the engine's first
        token arrives and the parser holds it (a turn that opens with a tool call needs
        ~15 tokens before its first event, the call's name), an empty list says the
        generation has started, so the stream can open now (a chat stream's first chunk,
        with the role, as OpenAI sends it) instead of after those tokens."""
        runner, prompt = self._runner, self.prompt
        if self._send_ids:
            self._prompt_ids, self._prompt_json = runner.tokenizer.encode_prompt_json(prompt)
            self.prompt_tokens = len(self._prompt_ids)
        else:
            self.prompt_tokens = count_prompt_tokens(runner.tokenizer, prompt)
        self._parser = self._new_parser(thinking=prompt.thinking,
                                        strict=runner.strict_tool_calls)
        user_stop = list(self.sampling.stop)
        forced = forced_opener(prompt, self.dialect)
        if forced and prompt.thinking:
            async for batch in self._generate(stop=[THINK_CLOSE]):
                yield batch
            self._backend_stop = None  # our own `</think>` stop, never the client's
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
        elif self._saw_eos and (batch := self._feed(EOS)):
            yield batch
        if batch := self._filter(self._parser.finish()):
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
            # Model-side text is re-encoded with control tokens matched: it is what the
            # model wrote (or what we force it to have written), never client text.
            more = self._runner.tokenizer.encode_generated(generated) if generated else []
            prompt_ids = self._prompt_ids + more
            if not more:
                ids_json = self._prompt_json
            elif self._prompt_ids:  # the prompt's array, extended
                ids_json = self._prompt_json[:-1] + "," + ",".join(map(str, more)) + "]"
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
            grammar=grammar,
        )
        self._backend_finish = self._backend_stop = None
        async with aclosing(
            self._runner.deltas(req, endpoint=self.endpoint, clock=self._clock)
        ) as deltas:
            async for merged in deltas:
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
                    cut = text.find(EOS)
                    if cut >= 0:
                        # Nothing follows EOS. It is held back (fed just before finish) so that
                        # a recovery continuation can still append `</think>`.
                        text = text[:cut]
                        self._saw_eos = True
                    if THINK_CLOSE in text:
                        self._in_reasoning = False
                        self._saw_think_close = True
                    self._generated.append(text)
                    if batch := self._feed(text):
                        yield batch
                    elif not self._started:
                        yield []
                    self._started = True
                    if self._first_call_done and not self.parallel_tool_calls:
                        self._stopped_after_first_call = True
                        break
                if self._stopped_after_first_call:
                    break  # closing `deltas` cancels the backend request

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
        per_token = not self.parallel_tool_calls and not self._first_call_done
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
                                delta.stop_reason if last else None)
        if rest > 0:
            yield GenerateDelta("", rest, delta.finish_reason, delta.stop_reason)

    def _inject(self, text: str, *, in_prompt: bool = False) -> list[Event]:
        """Text the model is made to have written: fed to the parser, appended to the prompt."""
        if not in_prompt:
            self._generated.append(text)
        if THINK_CLOSE in text:
            self._in_reasoning = False
            self._saw_think_close = True
        return self._feed(text)

    def _new_parser(self, *, thinking: bool, strict: bool = False) -> Any:
        # The rendering dialect's own tags are native to the parser, not repairs.
        return StreamParser(tools=self.prompt.tools, thinking=thinking, strict=strict,
                                 dialect=self.dialect)

    def _feed(self, text: str) -> list[Event]:
        return self._filter(self._parser.feed(text))

    def _filter(self, events: list[Event]) -> list[Event]:
        out = []
        for event in events:
            if isinstance(event, ToolCallStart | ToolCallArgsDelta | ToolCallEnd):
                if not self.parallel_tool_calls and event.index > 0:
                    continue  # parallel_tool_calls=false: only the first call is delivered
                if isinstance(event, ToolCallStart):
                    self._num_calls_started += 1
                elif isinstance(event, ToolCallEnd) and event.index == 0:
                    self._first_call_done = True
            self._observer.on_event(event)
            out.append(event)
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
        probe.feed("".join(self._generated))
        probe.finish()
        return not probe.result.tool_calls

    def _finish_turn(self) -> None:
        result: ParseResult = self._parser.result
        if not self.parallel_tool_calls:
            del result.tool_calls[1:]
        if self.recovered_empty and result.turn_outcome is not None and (
            result.tool_calls or result.content.strip()
        ):
            result.turn_outcome = TurnOutcome.RECOVERED_EMPTY
        if result.tool_calls:
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
