"""indexer_topk (radix select) vs the reference's stable sort, at the indexer's decode shapes.

    python -m bench.kernels.indexer_topk

scores [B, 8192] (a pool sized for 32K) with 1024 (4K context) or 8192 (32K) visible, k 512.
Bytes: the scores read and the indices written (the op is latency- and compute-bound: 32
counting passes over the row in registers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels._timing import copies_for, measure, print_table, row
from engine.kernels import indexer_topk as it

ENTRIES, TOPK = 8192, 512
CONTEXTS = (4096, 32768)
BATCHES = (1, 8, 32)


def make_scores(batch: int, context: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.randn(batch, ENTRIES, device=device, generator=g)
    scores[:, context // 4 :] = float("-inf")
    return scores


def bench(device: str = "cuda") -> list[dict]:
    rows = []
    for context in CONTEXTS:
        for batch in BATCHES:
            moved = batch * (ENTRIES * 4 + TOPK * 8)
            copies = copies_for(moved, moved)
            cases = [make_scores(batch, context, device, seed) for seed in range(copies)]
            shape = f"ctx={context} B={batch} N={ENTRIES} k={TOPK}"
            rows.append(row("indexer_topk", shape, *measure(lambda s: it.indexer_topk(s, TOPK),
                                                            cases), moved))  # fmt: skip
            ref = measure(lambda s: it.indexer_topk_reference(s, TOPK), cases)
            rows.append(row("indexer_topk_torch_sort", shape, *ref, moved))
    return rows


if __name__ == "__main__":
    print_table(bench("cuda"))
