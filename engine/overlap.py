"""Independent work of a decode step on a second CUDA stream, inside and outside graphs.

At batch 1 most of a layer's kernels are a few microseconds long and use a fraction of the
card, and each waits for the one before it. Some chains do not depend on each other: the
compressors read only the layer's input while the query / kv projections run, and the shared
expert reads only the MoE input while the router picks the routed experts. Running such a
chain on a side stream lets the card overlap the two; in a CUDA graph the fork and join are
captured as edges between two branches (the side stream joins the capture when it waits on
the capturing stream), so replays overlap too.

    side = fork(x)              # None off CUDA or when switched off: runs inline
    with on(side):
        ...                     # work that reads only tensors made before the fork
    ...                         # the main chain
    join(side)                  # main waits for the side work before using its results

Memory safety follows from the strict fork / join shape: the side stream starts each time
after everything queued on the main stream so far, and the main stream reads the side's
results only after the join, so the caching allocator's per-stream reuse never hands a block
to one stream while the other still uses it. Tensors the side work reads must stay referenced
until the join (callers keep them in scope).

Results are the same bits either way: the same kernels run on the same inputs; only their
interleaving on the card changes. `set_enabled(False)` runs everything on one stream (the
benchmark times both in one process).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_state = {"enabled": True}


def set_enabled(on: bool) -> None:
    _state["enabled"] = bool(on)


def enabled() -> bool:
    return _state["enabled"]


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def fork(x: torch.Tensor) -> torch.cuda.Stream | None:
    """A side stream that has waited for all work queued so far on x's current stream, or
    None (CPU, or overlap switched off): then `on(None)` runs inline."""
    if not (_state["enabled"] and x.is_cuda):
        return None
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    return side


def on_side_stream(device: torch.device) -> bool:
    """Whether work queued now on `device` goes to the side stream (engine/kernels/
    _counters.py keeps the two streams' arrival counters apart)."""
    return device.type == "cuda" and torch.cuda.current_stream(device) == _side_stream(device)


def on(side: torch.cuda.Stream | None):
    return contextlib.nullcontext() if side is None else torch.cuda.stream(side)


def join(side: torch.cuda.Stream | None) -> None:
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)
