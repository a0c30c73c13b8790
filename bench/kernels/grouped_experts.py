"""Prefill routed experts at V4-Flash's real shapes (E 256, K 6, H 4096, I 2048) on one GPU:
the grouped kernels (engine/kernels/grouped_experts.py) against the loop they replace.

    python bench/kernels/grouped_experts.py           # table: INT2 and FP4 at N = 512, 2048

`bench(device)` returns one row per (format, N): the grouped kernels' median time (tile plan,
both kernels, the K-sum), the bytes of the distinct experts read, GB/s, TFLOP/s (2 * 3 * H * I
per pair), and in the same process the reference loop's time (engine.moe's prefill before:
per used expert, dequantise W1, W3, W2 to bf16 and F.linear; a host sync per expert) and the
speedup. Weights are random codes in the stored formats (engine.random_weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels.routed_experts import INTER, LIMIT, E, H, K, make_stack
from engine.formats import WeightFormat
from engine.kernels import mode
from engine.kernels.grouped_experts import grouped_experts
from engine.kernels.routed_experts import dequantize_rows

TOKENS = (512, 2048)


def loop_reference(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, stack) -> torch.Tensor:
    """engine.moe's reference loop over a stack: each used expert dequantised to x.dtype."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():
        tok, slot = torch.where(experts == e)
        idx = torch.tensor([e], device=x.device)
        w13 = dequantize_rows(stack, "w13", idx)[0].to(x.dtype)
        w2 = dequantize_rows(stack, "w2", idx)[0].to(x.dtype)
        gu = F.linear(x[tok], w13).float()
        g, u = gu[:, :INTER].clamp(max=LIMIT), gu[:, INTER:].clamp(-LIMIT, LIMIT)
        h = (weights[tok, slot].unsqueeze(-1) * (F.silu(g) * u)).to(x.dtype)
        y[tok] += F.linear(h, w2).float()
    return y


def bench(device: str | torch.device = "cuda") -> list[dict]:
    from triton.testing import do_bench

    device = torch.device(device)
    rows = []
    for fmt in (WeightFormat.INT2, WeightFormat.FP4):
        stack = make_stack(fmt, device)
        per_expert = stack.expert_bytes()
        g = torch.Generator(device=device).manual_seed(1)
        for n in TOKENS:
            x = torch.randn(n, H, generator=g, device=device).bfloat16()
            experts = torch.rand(n, E, generator=g, device=device).argsort(dim=-1)[:, :K]
            weights = torch.rand(n, K, generator=g, device=device) + 0.25
            distinct = int(torch.unique(experts).numel())
            args = (x, experts, weights, stack)
            with mode("triton"):
                grouped_experts(*args, LIMIT)  # tune and compile
                us = do_bench(lambda a=args: grouped_experts(*a, LIMIT), return_mode="median") * 1e3
            ref_us = do_bench(lambda a=args: loop_reference(*a), warmup=1, rep=200,
                              return_mode="median") * 1e3
            nbytes = distinct * per_expert
            flops = 2 * 3 * H * INTER * n * K
            rows.append({"kernel": "grouped_experts", "shape": f"{fmt.value} N={n}",
                         "time_us": round(us, 1), "bytes": nbytes,
                         "gbps": round(nbytes / us / 1e3, 1),
                         "tflops": round(flops / us / 1e6, 1),
                         "loop_reference_us": round(ref_us, 1),
                         "speedup": round(ref_us / us, 1)})
    return rows


def main() -> None:
    rows = bench()
    print(f"device: {torch.cuda.get_device_name()}")
    cols = ("shape", "time_us", "gbps", "tflops", "loop_reference_us", "speedup")
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>18}" for c in cols))


if __name__ == "__main__":
    main()
