"""Routed-expert kernels at V4-Flash's real shapes (E 256, K 6, H 4096, I 2048) on one GPU.

    python bench/kernels/routed_experts.py            # table: INT2 and FP4 at N = 1, 8, 32

`bench(device)` returns one row per (format, N): median time of `routed_experts` (both
kernels and their staging), the bytes it must read (each distinct expert's packed words,
scales and zeros once), GB/s, and the bound those bytes give at the copy bandwidth measured
in the same run. Weights are random codes in the stored formats (engine.random_weights), all
256 experts of one layer; every call takes the next of 64 pre-drawn routings, so the 6-48
experts a call reads are rarely the ones the previous call left in L2 (50 MB on an H100).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels._timing import copy_gbps, with_graph
from engine.formats import WeightFormat
from engine.kernels import mode
from engine.kernels.routed_experts import (
    _FORMAT_CODE,
    ExpertStack,
    _size_class,
    _tuned,
    routed_experts,
)
from engine.random_weights import random_fp4, random_int2

E, K, H, INTER = 256, 6, 4096, 2048
LIMIT = 10.0
TOKENS = (1, 8, 32)
ROUTINGS = 64


def make_stack(fmt: WeightFormat, device: torch.device, seed: int = 0) -> ExpertStack:
    g = torch.Generator(device=device).manual_seed(seed)
    if fmt == WeightFormat.INT2:
        return ExpertStack(fmt, H, INTER, *random_int2(E, 2 * INTER, H, H ** -0.5, g, device),
                           *random_int2(E, H, INTER, INTER ** -0.5, g, device))
    w13, s13 = random_fp4(E, 2 * INTER, H, H ** -0.5, g, device)
    w2, s2 = random_fp4(E, H, INTER, INTER ** -0.5, g, device)
    return ExpertStack(fmt, H, INTER, w13, s13, None, w2, s2, None)


def bench(device: str | torch.device = "cuda") -> list[dict]:
    from triton.testing import do_bench

    device = torch.device(device)
    copy = copy_gbps(device)
    rows = []
    for fmt in (WeightFormat.INT2, WeightFormat.FP4):
        stack = make_stack(fmt, device)
        per_expert = stack.expert_bytes()
        g = torch.Generator(device=device).manual_seed(1)
        for n in TOKENS:
            x = torch.randn(n, H, generator=g, device=device).bfloat16()
            routes = [torch.rand(n, E, generator=g, device=device).argsort(dim=-1)[:, :K]
                      for _ in range(ROUTINGS)]
            weights = torch.rand(n, K, generator=g, device=device)
            out = torch.empty(n, H, dtype=torch.float32, device=device)
            distinct = sum(len(torch.unique(r)) for r in routes) / ROUTINGS  # setup, not timed
            nbytes = int(distinct * per_expert)
            step = iter(range(1 << 62))

            def call(routes=routes, x=x, weights=weights, out=out, step=step, stack=stack):
                routed_experts(x, routes[next(step) % ROUTINGS], weights, stack, LIMIT, out=out)

            with mode("triton"):
                call()  # autotune + compile outside the timing
                ms = do_bench(call, return_mode="median")
            us = ms * 1e3
            rows.append({
                "kernel": f"routed_experts_{fmt}",
                "shape": f"N={n} K={K} E={E} H={H} I={INTER}",
                "time_us": round(us, 2),
                "bytes": nbytes,
                "gbps": round(nbytes / us / 1e3, 1),
                "copy_gbps": round(copy, 1),
                "bound_us": round(nbytes / copy / 1e3, 2),
                "pct_of_copy": round(100 * nbytes / us / 1e3 / copy, 1),
                "distinct_experts": round(distinct, 1),
            })
            with mode("triton"):
                with_graph(rows[-1], call)
            rows[-1]["configs"] = _picked(_FORMAT_CODE[fmt], n)
        del stack
        torch.cuda.empty_cache()
    return rows


def _picked(fmt: int, n: int) -> dict[str, str]:
    """The autotuner's tile for each kernel at this token count (its cache; the size class is
    the fifth of both kernels' autotune keys)."""
    out = {}
    for kernel in ("gate_up", "down"):
        cache = getattr(_tuned(kernel, fmt), "cache", {})
        picks = [str(c) for key, c in cache.items() if key[4] == _size_class(n)]
        out[kernel] = picks[-1] if picks else "?"
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/kernels/routed_experts.py needs a CUDA device")
    rows = bench("cuda")
    print(f"device: {torch.cuda.get_device_name()}  copy: {rows[0]['copy_gbps']:.0f} GB/s")
    print(f"{'kernel':<22} {'N':>3} {'experts':>8} {'MB read':>9} {'time us':>9} "
          f"{'bound us':>9} {'GB/s':>8} {'% copy':>7}")
    for r in rows:
        n = r["shape"].split()[0].removeprefix("N=")
        print(f"{r['kernel']:<22} {n:>3} {r['distinct_experts']:>8} {r['bytes'] / 1e6:>9.1f} "
              f"{r['time_us']:>9.1f} {r['bound_us']:>9.1f} {r['gbps']:>8.0f} "
              f"{r['pct_of_copy']:>7.1f}  graph {r.get('graph_us')} us  {r['configs']}")


if __name__ == "__main__":
    main()
