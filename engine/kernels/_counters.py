"""Arrival counters for kernels whose last-arriving program finishes the work.

The FP8 GEMV's split-K reduction, the routed experts' down kernel and the fused router's
top-k each let the programs of a tile (or token) bump an int32 counter when their part is
stored; the program that arrives last reads the parts, writes the result and resets the
counter to 0. So a counter is 0 between launches, and one zeroed buffer serves every launch
that cannot overlap another: one buffer per device and stream lane, the main chain and
engine.overlap's side stream (whose launches do run beside the main chain's). Two main-lane
streams (the runner's warm-up stream, a capture stream) only ever run one after another.

Buffers are made outside CUDA-graph capture (the warm-up steps before a capture use both
lanes): a tensor first made inside a capture would come from that graph's private pool.
A request for more counters than a lane has grows its buffer outside a capture and raises
inside one; an outgrown buffer is kept alive, since a captured graph may still point at it.
"""

from __future__ import annotations

import torch

from engine import overlap

_BUFFERS: dict[tuple[str, bool], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """At least `size` int32 counters, all 0, for the current stream's lane on `device`."""
    key = (str(device), overlap.on_side_stream(device))
    have = _BUFFERS.get(key)
    if have is None or have.numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{size} arrival counters needed, "
                               f"{0 if have is None else have.numel()} made before capture "
                               "(run a warm-up step first)")
        if have is not None:
            _OUTGROWN.append(have)
        _BUFFERS[key] = have = torch.zeros(size, dtype=torch.int32, device=device)
    return have
