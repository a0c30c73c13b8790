"""The embedded engine's side of constrained decoding: an llguidance matcher behind the
engine's logits-mask hook (engine.sampling).

The hook is called with the sequence's ids after the step's forward was queued on the GPU
and before the logits are read: the mask is computed on the CPU while the GPU runs the
step, then applied on the device with no host sync (`llguidance.torch`). The matcher never
allows nothing: when the grammar is done or in error, EOS alone is allowed (the grammar
ends every turn with EOS), so the sampler's all-banned check is not needed.

A decode batch of several constrained sequences computes their masks together first
(`GrammarMask.prepare_batch`, which the engine calls for any mask class that has it):
llguidance's executor fills the rows on its own thread pool with the GIL released, instead
of one row after another on the engine's thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import llguidance.torch as llt
import torch

from dsml.grammar_match import EOS_ID, compiled_matcher, ll_tokenizer


class GrammarMask:
    """A logits-mask callable for one sequence: `mask(token_ids, logits) -> logits`."""

    never_empty = True  # engine.sampling skips its all-banned check (a host sync)

    def __init__(self, grammar: str, prompt_len: int) -> None:
        self.matcher: llguidance.LLMatcher = compiled_matcher(grammar)
        self._seen = prompt_len  # ids before this are the prompt
        self._bitmask = llt.allocate_token_bitmask(1, ll_tokenizer().vocab_size)
        if torch.cuda.is_available():
            self._bitmask = self._bitmask.pin_memory()
        self.rejected = 0  # tokens the matcher refused (sampled while it was stopped)
        self._ready: int | None = None  # len(token_ids) _bitmask was prepared for

    _executor: llguidance.LLExecutor | None = None  # shared by every mask of the process

    @classmethod
    def prepare_batch(cls, pairs: Sequence[tuple[GrammarMask, Sequence[int]]]) -> None:
        """Compute the next bitmask of every (mask, token_ids) at once; each mask's next
        call with those ids then reads it instead of computing it alone."""
        live: list[tuple[GrammarMask, int]] = []
        for mask, token_ids in pairs:
            mask._advance(token_ids)
            if mask._finished():
                mask._eos_only()
                mask._ready = len(token_ids)
            else:
                live.append((mask, len(token_ids)))
        if not live:
            return
        if cls._executor is None:
            cls._executor = llguidance.LLExecutor()
        rows = llt.allocate_token_bitmask(len(live), ll_tokenizer().vocab_size)
        llt.fill_next_token_bitmask_par(cls._executor, [(m.matcher, i) for i, (m, _) in
                                                        enumerate(live)], rows)
        for i, (mask, n) in enumerate(live):
            mask._bitmask.copy_(rows[i : i + 1])
            mask._ready = n

    def _finished(self) -> bool:
        return self.matcher.is_error() or self.matcher.is_stopped()

    def _eos_only(self) -> None:
        self._bitmask.zero_()
        self._bitmask[0, EOS_ID // 32] = 1 << (EOS_ID % 32)

    def _advance(self, token_ids: Sequence[int]) -> None:
        for token in token_ids[self._seen:]:
            if not self.matcher.consume_token(token):
                self.rejected += 1
        self._seen = len(token_ids)

    def bitmask(self, token_ids: Sequence[int]) -> torch.Tensor:
        """The allowed-token bitmask after `token_ids` (int32 [1, ceil(V/32)], CPU)."""
        if self._ready == len(token_ids):  # prepare_batch filled it for these ids
            self._ready = None
            return self._bitmask
        self._ready = None
        self._advance(token_ids)
        if self._finished():
            self._eos_only()
        else:
            llt.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        return self._bitmask

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        bits = self.bitmask(token_ids).to(logits.device, non_blocking=True)
        return apply_bitmask(logits, bits)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`logits [V]` with -inf where the int32 bitmask `[1, ceil(V/32)]` has a 0 bit; device
    ops only (no host sync). llguidance's own `apply_token_bitmask_inplace` takes ~75 ms for
    this vocabulary on the CPU; this takes ~2 ms there and one elementwise pass on a GPU."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32,
                                                       device=logits.device)
    allowed = ((bits[0, :, None] >> shifts) & 1).bool().reshape(-1)[: logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))
