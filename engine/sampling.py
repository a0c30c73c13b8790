"""Choosing the next token from the logits: greedy, temperature, top-k, top-p, and a mask hook.

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `logits [..., V]` (int64 on the logits' device, no host sync)."""
    logits = logits.float()
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / race, dim=-1)


class Sampler:
    """Per-sequence sampling state: the params, and the seeded generator on the logits' device."""

    def __init__(self, params: SamplingParams, device: torch.device | str) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, token_ids: Sequence[int] = ()) -> torch.Tensor:
        """Next token for logits `[V]`, as a 0-d int64 tensor on the logits' device.

        `token_ids` (prompt and generated so far) is only passed to a callable mask.
        """
        mask = self.params.logits_mask
        logits = apply_mask(logits.float(), mask, token_ids)
        # A mask that says it never bans every token (a grammar mask falls back to EOS) is
        # trusted: the check below is a host sync per step.
        if mask is not None and not getattr(mask, "never_empty", False) \
                and not torch.isfinite(logits).any():
            # One host sync, only when a mask is in use: an all-banned step is a grammar bug.
            raise ValueError("logits mask allows no token")
        return sample(logits, self.params, self.generator)
