"""Shared timing for the per-kernel benchmarks.

Each op is timed twice: `triton.testing.do_bench` (median of single launches, L2 flushed
before each: includes the CPU launch latency, which dominates microsecond kernels) and inside
one CUDA graph of many calls (`do_bench_cudagraph`, median): the decode step's real setting,
where launches cost ~1-2 us each. Inputs rotate over several copies so the graph's calls
do not find them in L2 (50 MB on H100/H200).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

L2_BYTES = 50 << 20
ROTATE_BYTES = 4 * L2_BYTES


def copies_for(touched_bytes: int, allocated_bytes: int, max_alloc: int = 4 << 30) -> int:
    """How many input copies keep a rotation's working set at 4x L2, within max_alloc."""
    want = -(-ROTATE_BYTES // max(touched_bytes, 1))
    fit = max(1, max_alloc // max(allocated_bytes, 1))
    return max(2, min(want, fit, 64))


def measure(call: Callable[[dict], object], cases: list[dict]) -> tuple[float, float | None]:
    """(do_bench median us, CUDA-graph median us per call) of call(case), rotating cases."""
    import triton.testing

    counter = itertools.count()

    def step() -> None:
        call(cases[next(counter) % len(cases)])

    eager_us = triton.testing.do_bench(step, return_mode="median") * 1e3
    try:
        graph_us = triton.testing.do_bench_cudagraph(step, return_mode="median") * 1e3
    except Exception:  # an op that cannot be captured still gets its eager time
        graph_us = None
    return eager_us, graph_us


def row(kernel: str, shape: str, eager_us: float, graph_us: float | None, nbytes: int) -> dict:
    return {
        "kernel": kernel,
        "shape": shape,
        "time_us": round(eager_us, 2),
        "graph_us": None if graph_us is None else round(graph_us, 2),
        "bytes": int(nbytes),
        "gbps": round(nbytes / eager_us / 1e3, 1),
        "graph_gbps": None if graph_us is None else round(nbytes / graph_us / 1e3, 1),
    }


def print_table(rows: list[dict]) -> None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name}")
    cols = ("kernel", "shape", "time_us", "graph_us", "bytes", "gbps", "graph_gbps")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))


def median_us(fn: Callable[[], object]) -> float:
    """do_bench's median of fn() in microseconds, after one call outside the timing (compile,
    autotune: do_bench sizes its loop on its first call)."""
    import triton.testing

    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_median_us(fn: Callable[[], object]) -> float | None:
    """Median us of fn() per call inside one CUDA graph of many calls (the decode step's
    setting: no CPU launch latency), after fn() ran once outside (compile, autotune); None
    where fn cannot be captured."""
    import triton.testing

    fn()
    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3
    except Exception:
        return None


def with_graph(r: dict, fn: Callable[[], object]) -> dict:
    """Row r (time_us, bytes) plus the CUDA-graph time of fn and its GB/s."""
    g = graph_median_us(fn)
    r["graph_us"] = None if g is None else round(g, 2)
    r["graph_gbps"] = None if g is None or not r.get("bytes") else round(r["bytes"] / g / 1e3, 1)
    return r


def copy_gbps(device: str | torch.device = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s): the ceiling
    every kernel's GB/s is compared with."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_us(lambda: dst.copy_(src)) * 1e-6) / 1e9


class Rotating:
    """fn(x, *operands[i]) with i cycling over the copies: each call reads cold weights."""

    def __init__(self, fn: Callable[..., object], x: torch.Tensor, operands: list) -> None:
        self.fn, self.x, self.operands, self.i = fn, x, operands, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % len(self.operands)
        return self.fn(self.x, *self.operands[self.i])
