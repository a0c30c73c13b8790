"""decode_attention at V4-Flash shapes: the Triton kernel vs its PyTorch reference.

    python -m bench.kernels.decode_attention            # table on the GPU
    python -m bench.kernels.decode_attention --tune     # also every tile configuration

Layers (at 32K context): ratio 4 = ring 128 + 512 indexer-chosen of 8192 entries, ratio 128 =
ring + all 256 entries, ratio 0 = ring only; 64 heads x 512, batch 1 / 8 / 32. Bytes are what
the op must move: q, the ring rows and selected entries it reads (each once), the indices and
the output; the fp32 split partials are overhead, not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels._timing import copies_for, measure, print_table, row
from engine.kernels import decode_attention as da

HEADS, DIM, RING, POSITION = 64, 512, 128, 32767
LAYERS = {"ratio4": (8192, 512), "ratio128": (256, 256), "ratio0": (0, 0)}  # (N, Kc)
BATCHES = (1, 8, 32)


def make_case(batch: int, n_entries: int, kc: int, device: str, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = dict(device=device, dtype=torch.bfloat16, generator=g)
    entries = entry_idx = None
    if n_entries:
        entries = torch.randn(batch, n_entries, DIM, **bf16)
        if kc < n_entries:  # the indexer's top-k: scattered entries
            pick = torch.rand(batch, n_entries, device=device, generator=g).argsort(dim=-1)
            entry_idx = pick[:, :kc].contiguous()
        else:
            entry_idx = torch.arange(kc, device=device).expand(batch, kc).contiguous()
    return dict(
        q=torch.randn(batch, HEADS, DIM, **bf16),
        window=torch.randn(batch, RING, DIM, **bf16),
        entries=entries,
        slots=torch.arange(batch, device=device),
        positions=torch.full((batch,), POSITION, device=device),
        entry_idx=entry_idx,
        sink=torch.randn(HEADS, device=device, generator=g),
        softmax_scale=DIM**-0.5,
    )


def moved_bytes(batch: int, kc: int) -> int:
    """q and out (bf16), the ring rows and selected entries read once, the int64 indices."""
    return 2 * batch * (2 * HEADS * DIM + (RING + kc) * DIM) + 8 * batch * kc


def bench(device: str = "cuda", tune: bool = False) -> list[dict]:
    rows = []
    for layer, (n_entries, kc) in LAYERS.items():
        for batch in BATCHES:
            moved = moved_bytes(batch, kc)
            allocated = 2 * batch * (HEADS * DIM + (RING + n_entries) * DIM)
            copies = copies_for(moved, allocated)
            cases = [make_case(batch, n_entries, kc, device, seed) for seed in range(copies)]
            shape = f"{layer} B={batch} Hh={HEADS} D={DIM} W={RING} N={n_entries} Kc={kc}"
            variants = {"decode_attention": {}}
            if tune:
                for bh in (16, 32):
                    for bn in (16, 32, 64):
                        for warps in (4, 8):
                            cfg = dict(block_h=bh, block_n=bn, num_warps=warps)
                            variants[f"decode_attention[h{bh} n{bn} w{warps}]"] = cfg
                # key splits past the launcher's MAX_SPLITS (fewer keys a program, more
                # fp32 partials to merge) on the default tile
                for splits in (4, 8, 32, 64):
                    variants[f"decode_attention[splits {splits}]"] = dict(num_splits=splits)
            for name, cfg in variants.items():
                t = measure(lambda c, cfg=cfg: da.launch(**c, **cfg), cases)
                rows.append(row(name, shape, *t, moved))
            ref = measure(lambda c: da.decode_attention_reference(**c), cases)
            rows.append(row("decode_attention_torch", shape, *ref, moved))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="time every tile configuration")
    print_table(bench("cuda", tune=parser.parse_args().tune))
