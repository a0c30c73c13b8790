"""rmsnorm_rope / rope at attention's decode shapes (D 512, R 64): Triton vs the reference.

    python -m bench.kernels.rmsnorm_rope

q: [B, 64, 512] per-head norm (no weight) + RoPE; kv: [B, 512] kv_norm + RoPE; out: the
inverse RoPE of the attention output [B, 64, 512]; rmsnorm: [B, 4096] (attn/ffn norm). Bytes: x read, out written (bf16),
cos/sin and the weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels._timing import copies_for, measure, print_table, row
from engine.kernels import mode
from engine.kernels import rmsnorm_rope as rr

HEADS, DIM, ROPE, EPS = 64, 512, 64, 1e-6
BATCHES = (1, 32)


def make_case(batch: int, heads: int | None, device: str, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, DIM) if heads is None else (batch, heads, DIM)
    angles = torch.rand(batch, ROPE // 2, device=device, generator=g) * 1000
    return dict(
        x=torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g),
        weight=torch.ones(DIM, device=device, dtype=torch.bfloat16),
        cos=angles.cos(),
        sin=angles.sin(),
    )


def bench(device: str = "cuda") -> list[dict]:
    rows = []
    ops = {  # name: (heads, Triton call, reference call)
        "rmsnorm_rope q": (
            HEADS,
            lambda c: rr.rmsnorm_rope(c["x"], None, c["cos"], c["sin"], EPS),
            lambda c: rr.rmsnorm_rope_reference(c["x"], None, c["cos"], c["sin"], EPS),
        ),
        "rmsnorm_rope kv": (
            None,
            lambda c: rr.rmsnorm_rope(c["x"], c["weight"], c["cos"], c["sin"], EPS),
            lambda c: rr.rmsnorm_rope_reference(c["x"], c["weight"], c["cos"], c["sin"], EPS),
        ),
        "rope inverse out": (
            HEADS,
            lambda c: rr.rope(c["x"], c["cos"], c["sin"], inverse=True),
            lambda c: rr.rope_reference(c["x"], c["cos"], c["sin"], inverse=True),
        ),
    }
    for batch in BATCHES:
        for name, (heads, fast, ref) in ops.items():
            moved = 2 * 2 * batch * (heads or 1) * DIM + batch * ROPE * 4 + DIM * 2
            copies = copies_for(moved, moved)
            cases = [make_case(batch, heads, device, seed) for seed in range(copies)]
            shape = f"B={batch} Hx={heads or 1} D={DIM} R={ROPE}"
            rows.append(row(name, shape, *measure(fast, cases), moved))
            rows.append(row(f"{name} torch", shape, *measure(ref, cases), moved))
        hidden = 4096  # attn_norm / ffn_norm over the collapsed hidden state
        moved = 2 * 2 * batch * hidden + hidden * 2
        copies = copies_for(moved, moved)
        cases = [
            torch.randn(batch, hidden, device=device, dtype=torch.bfloat16) for _ in range(copies)
        ]
        weight = torch.ones(hidden, device=device, dtype=torch.bfloat16)
        shape = f"B={batch} H={hidden}"
        fast = measure(lambda x, w=weight: rr.rmsnorm(x, w, EPS), cases)
        rows.append(row("rmsnorm", shape, *fast, moved))
        with mode("reference"):  # RMSNorm.forward's torch ops
            with_ref = measure(lambda x, w=weight: rr.rmsnorm(x, w, EPS), cases)
        rows.append(row("rmsnorm torch", shape, *with_ref, moved))
    return rows


if __name__ == "__main__":
    print_table(bench("cuda"))
