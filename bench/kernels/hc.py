"""Hyper-connection kernels at V4-Flash shapes (S 4, H 4096): Triton vs the PyTorch reference.

    python -m bench.kernels.hc

hc_pre and hc_post run twice per layer (86 times a token), hc_head once; hc_post_pre (an
attention sub-layer's hc_post fused with the ffn's hc_pre) once per layer. Bytes are what the
op must move: fn (24 x 16384 fp32 = 1.5 MB; 4 x 16384 for the head), the streams h
[N, 4, 4096] bf16, and the outputs; the fp32 split partials are overhead, not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels._timing import copies_for, measure, print_table, row
from engine.config import ModelConfig
from engine.kernels import hc

CONFIG = ModelConfig.flash()
S, H, M = CONFIG.hc_mult, CONFIG.hidden_size, CONFIG.hc_mix_dim
TOKENS = (1, 4, 32)


def make_case(n: int, rows: int, device: str, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return dict(
        h=torch.randn(n, S, H, device=device, dtype=torch.bfloat16, generator=g),
        y=torch.randn(n, H, device=device, dtype=torch.bfloat16, generator=g),
        fn=torch.randn(rows, S * H, device=device, generator=g) * (S * H) ** -0.5,
        scale=torch.ones(3 if rows == M else 1, device=device),
        base=torch.randn(rows, device=device, generator=g) * 0.5,
        post=2 * torch.rand(n, S, device=device, generator=g),
        comb=torch.rand(n, S, S, device=device, generator=g),
    )


def bench(device: str = "cuda") -> list[dict]:
    rows = []
    for n in TOKENS:
        stream_bytes = n * S * H * 2
        ops = {  # name: (fn rows, bytes moved, Triton call, reference call)
            "hc_pre": (
                M,
                M * S * H * 4 + stream_bytes + n * H * 2 + n * (S + S * S) * 4,
                lambda c: hc.hc_pre(c["h"], c["fn"], c["scale"], c["base"], CONFIG),
                lambda c: hc.hc_pre_reference(c["h"], c["fn"], c["scale"], c["base"], CONFIG),
            ),
            "hc_post": (
                M,
                2 * stream_bytes + n * H * 2 + n * (S + S * S) * 4,
                lambda c: hc.hc_post(c["y"], c["h"], c["post"], c["comb"]),
                lambda c: hc.hc_post_reference(c["y"], c["h"], c["post"], c["comb"]),
            ),
            "hc_post_pre": (
                M,
                M * S * H * 4 + 2 * stream_bytes + 2 * n * H * 2 + 2 * n * (S + S * S) * 4,
                lambda c: hc.hc_post_pre(
                    c["y"], c["h"], c["post"], c["comb"], c["fn"], c["scale"], c["base"], CONFIG
                ),
                lambda c: hc.hc_pre_reference(
                    hc.hc_post_reference(c["y"], c["h"], c["post"], c["comb"]),
                    c["fn"],
                    c["scale"],
                    c["base"],
                    CONFIG,
                ),
            ),
            "hc_head": (
                S,
                S * S * H * 4 + stream_bytes + n * H * 2,
                lambda c: hc.hc_head(c["h"], c["fn"], c["scale"], c["base"], CONFIG),
                lambda c: hc.hc_head_reference(c["h"], c["fn"], c["scale"], c["base"], CONFIG),
            ),
        }
        for name, (fn_rows, moved, fast, ref) in ops.items():
            copies = copies_for(moved, moved)
            cases = [make_case(n, fn_rows, device, seed) for seed in range(copies)]
            shape = f"N={n} S={S} H={H}" + (f" M={fn_rows}" if name != "hc_post" else "")
            rows.append(row(name, shape, *measure(fast, cases), moved))
            rows.append(row(f"{name}_torch", shape, *measure(ref, cases), moved))
    return rows


if __name__ == "__main__":
    print_table(bench("cuda"))
