"""indexer_scores at V4-Flash shapes (Hi 64, Di 128, bf16 keys): Triton vs the PyTorch reference.

    python -m bench.kernels.indexer_scores

Contexts 4K / 32K (1024 / 8192 visible entries per row) in a pool sized for 32K (8192
entries a slot), batch 1 / 8 / 32. Bytes: q, weights, the visible keys (read once) and the
[B, N] scores written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels._timing import copies_for, measure, print_table, row
from engine.kernels import indexer_scores as ix

HEADS, DIM, ENTRIES = 64, 128, 8192
CONTEXTS = (4096, 32768)
BATCHES = (1, 8, 32)


def make_case(batch: int, context: int, device: str, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return dict(
        q=torch.randn(batch, HEADS, DIM, device=device, generator=g),
        keys=torch.randn(batch, ENTRIES, DIM, device=device, dtype=torch.bfloat16, generator=g),
        slots=torch.arange(batch, device=device),
        positions=torch.full((batch,), context - 1, device=device),
        weights=torch.randn(batch, HEADS, device=device, generator=g) * 0.01,
    )


def bench(device: str = "cuda") -> list[dict]:
    rows = []
    for context in CONTEXTS:
        for batch in BATCHES:
            visible = context // 4
            moved = batch * (HEADS * DIM * 4 + HEADS * 4 + visible * DIM * 2 + ENTRIES * 4)
            copies = copies_for(moved, batch * ENTRIES * DIM * 2)
            cases = [make_case(batch, context, device, seed) for seed in range(copies)]
            shape = f"ctx={context} B={batch} Hi={HEADS} Di={DIM} N={ENTRIES}"
            rows.append(row("indexer_scores", shape, *measure(lambda c: ix.indexer_scores(**c),
                                                              cases), moved))  # fmt: skip
            ref = measure(lambda c: ix.indexer_scores_reference(**c), cases)
            rows.append(row("indexer_scores_torch", shape, *ref, moved))
    return rows


if __name__ == "__main__":
    print_table(bench("cuda"))
