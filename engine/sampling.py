"""Choosing the next token from the logits: greedy, temperature, top-k, top-p, min-p,
penalties, logit bias, logprobs, and a mask hook.

`Sampler(params, device)` keeps one seeded `torch.Generator` per sequence, so a request with a
seed reproduces its tokens whatever else the engine runs. Sampling never leaves the device:
instead of `torch.multinomial` it draws `argmax(p / q)` with `q ~ Exp(1)` (the exponential
race; gpt-fast's `multinomial_sample_one_no_sync`), which picks token i with probability
`p_i` and needs no host sync, so the decode loop can queue the next step before reading the
token back.

The logits-mask hook is where constrained decoding plugs in. It is either a callable
`(token_ids_so_far, logits) -> logits` (free to return logits with -inf on banned ids) or a
bool tensor `[V]` of allowed ids. It runs before temperature, top-k and top-p, so those act on
the allowed tokens only; a mask that allows nothing is an error, not a silent EOS.

The order, as vLLM's sampler has it: mask, logit bias, penalties (repetition over prompt and
output; frequency and presence over the output only, OpenAI's definition), then greedy or
temperature -> top-k -> top-p -> min-p. Penalties and bias apply to greedy decoding too.
Logprobs are those of the model's own distribution (log-softmax of the raw logits, before the
mask, bias, penalties and temperature: vLLM's default `raw_logprobs`), so they say how likely
the model found a token, not how it was drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

LogitsMaskFn = Callable[[Sequence[int], torch.Tensor], torch.Tensor]
LogitsMask = LogitsMaskFn | torch.Tensor


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` are off."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logits_mask: LogitsMask | None = field(default=None, compare=False)
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurs in the output
    repetition_penalty: float = 1.0  # > 1: tokens of prompt or output less likely (HF/vLLM)
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)  # id -> + logit
    logprobs: int | None = None  # None: off; N: the sampled token's logprob and the top N

    def __post_init__(self) -> None:
        # These come from client requests: exceptions, never asserts.
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (top alternatives), got {self.logprobs}")
        if any(t < 0 or not math.isfinite(b) for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias needs token ids >= 0 and finite biases")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty
                    or self.repetition_penalty != 1)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The sampled token's logprob, and the `top` (token id, logprob), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_mask(logits: torch.Tensor, mask: LogitsMask | None, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits `[V]` with the hook applied (a callable, or a bool tensor of allowed ids)."""
    if mask is None:
        return logits
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.shape != logits.shape:
            raise ValueError(f"logits mask must be a bool tensor of shape {list(logits.shape)}, "
                             f"got {mask.dtype} {list(mask.shape)}")
        return logits.masked_fill(~mask.to(logits.device), float("-inf"))
    out = mask(token_ids, logits)
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        raise ValueError(f"logits mask callable must return a tensor of shape {list(logits.shape)}")
    return out


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the smallest top-p nucleus.

    The nucleus keeps each token whose preceding cumulative probability is below `top_p`, so
    the most likely token always survives and the token that crosses `top_p` is included.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Set to -inf every logit whose probability is below `min_p` x the most likely one's
    (the top token always survives)."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < floor, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `logits [..., V]` (int64 on the logits' device, no host sync)."""
    logits = logits.float()
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    logits = filter_min_p(logits, params.min_p)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / race, dim=-1)


class Sampler:
    """Per-sequence sampling state: the params, and the seeded generator on the logits' device."""

    def __init__(self, params: SamplingParams, device: torch.device | str) -> None:
        self.params = params
        self.device = torch.device(device)
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        # Penalty state, built on the first call: the first `token_ids` is the prompt.
        self._prompt_len: int | None = None
        self._num_counted = 0  # token_ids already in _counts / _seen
        self._counts: torch.Tensor | None = None  # [V] occurrences in the output
        self._seen: torch.Tensor | None = None  # [V] in the prompt or the output
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values)
        self._logprobs: tuple[torch.Tensor, ...] | None = None  # of the last call, on device

    def __call__(self, logits: torch.Tensor, token_ids: Sequence[int] = ()) -> torch.Tensor:
        """Next token for logits `[V]`, as a 0-d int64 tensor on the logits' device.

        `token_ids` (prompt and generated so far, growing by one token per call) feeds a
        callable mask and the penalties: the first call's `token_ids` is taken as the prompt.
        """
        params = self.params
        raw = logits.float()
        mask = params.logits_mask
        logits = apply_mask(raw, mask, token_ids)
        # A mask that says it never bans every token (a grammar mask falls back to EOS) is
        # trusted: the check below is a host sync per step.
        if mask is not None and not getattr(mask, "never_empty", False) \
                and not torch.isfinite(logits).any():
            # One host sync, only when a mask is in use: an all-banned step is a grammar bug.
            raise ValueError("logits mask allows no token")
        if params.logit_bias:
            ids, values = self._bias_tensors(logits.shape[-1])
            logits = logits.index_add(-1, ids, values)
        if params.penalized:
            logits = self._penalize(logits, token_ids)
        token = sample(logits, params, self.generator)
        if params.logprobs is not None:
            # Queued on the device now, read back by take_logprobs() with the token.
            logprobs = torch.log_softmax(raw, dim=-1)
            top = torch.topk(logprobs, min(params.logprobs, logprobs.shape[-1]), dim=-1)
            self._logprobs = (logprobs.gather(-1, token.unsqueeze(-1)), top.values, top.indices)
        return token

    def take_logprobs(self) -> TokenLogprobs | None:
        """The last sampled token's logprobs (a host sync), once; None when not asked for."""
        if self._logprobs is None:
            return None
        chosen, values, ids = self._logprobs
        self._logprobs = None
        return TokenLogprobs(float(chosen.item()), tuple(zip(ids.tolist(), values.tolist(),
                                                              strict=True)))

    def _bias_tensors(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bias is None:
            bad = [t for t in self.params.logit_bias if t >= vocab]
            if bad:
                raise ValueError(f"logit_bias token ids out of range (vocabulary {vocab}): {bad[:5]}")
            ids = torch.tensor(list(self.params.logit_bias), dtype=torch.long, device=self.device)
            values = torch.tensor(list(self.params.logit_bias.values()), dtype=torch.float32,
                                  device=self.device)
            self._bias = (ids, values)
        return self._bias

    def _penalize(self, logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        params, vocab = self.params, logits.shape[-1]
        if self._prompt_len is None:
            self._prompt_len = len(token_ids)
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=logits.device)
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        assert self._counts is not None and self._seen is not None
        start = self._num_counted
        if len(token_ids) > start:
            new = torch.tensor(list(token_ids[start:]), dtype=torch.long, device=logits.device)
            self._seen[new] = True
            output = new[max(0, self._prompt_len - start):]  # the generated ones among them
            if output.numel():
                self._counts.index_add_(0, output, torch.ones_like(output, dtype=torch.float32))
            self._num_counted = len(token_ids)
        if params.repetition_penalty != 1:
            rep = params.repetition_penalty
            logits = torch.where(self._seen, torch.where(logits > 0, logits / rep, logits * rep),
                                 logits)
        if params.frequency_penalty:
            logits = logits - params.frequency_penalty * self._counts
        if params.presence_penalty:
            logits = logits - params.presence_penalty * (self._counts > 0).float()
        return logits
