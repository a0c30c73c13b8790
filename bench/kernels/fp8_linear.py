"""FP8 block-scaled GEMV (engine.kernels.fp8_linear) at the real V4-Flash shapes, on a GPU.

    PYTHONPATH=. python -m bench.kernels.fp8_linear            # table + copy bandwidth
    PYTHONPATH=. python -m bench.kernels.fp8_linear --rows 1 --json out.json

For every projection (N x K, G groups) and batch M in {1, 8, 32}: the Triton kernel (autotuned
once per key before timing, the chosen config printed), the engine's reference path
(`F.linear(x, dequantize_fp8(W))`, what decode ran before issue 15), and a plain bf16 GEMV on a
weight dequantised in advance (cuBLAS reading 2 bytes per weight: what dequantising at load
would give). Times are triton.testing.do_bench medians. Each timed call reads a different copy
of the weight, with enough copies (>= 4, >= 128 MB in all) that the 50-60 MB L2 cannot hold
them; do_bench also flushes L2 before each call. `bytes` is what the op must move (FP8 weight +
E8M0 scales + x + out), the same figure for all three rows so GB/s compare directly; the copy
bandwidth (a 1 GiB device-to-device copy, bytes read + written) is the ceiling.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from bench.kernels._timing import Rotating, copy_gbps, median_us, with_graph
from engine import formats as fm
from engine.kernels import fp8_linear as fl

# name: (N per group, K, G)
SHAPES = {
    "wq_a": (1024, 4096, 1),
    "wq_b": (32768, 1024, 1),
    "wkv": (512, 4096, 1),
    "wo_a": (1024, 4096, 8),
    "wo_b": (4096, 8192, 1),
    "shared w1/w3": (2048, 4096, 1),
    "shared w2": (4096, 2048, 1),
    "indexer wq_b": (8192, 1024, 1),
    "mtp e/h_proj": (4096, 4096, 1),
}
ROWS = (1, 8, 32)
MIN_ROTATION_BYTES = 128 << 20


def _fp8_copies(rows: int, k: int, device: str, copies: int):
    q, s = fm.quantize_fp8(torch.randn(rows, k, device=device) * 0.02)
    return [(q.clone(), s.clone()) for _ in range(copies)]


def _bench_shape(name: str, n: int, k: int, g: int, rows: tuple[int, ...], device: str,
                 act_quant: bool, baselines: bool, all_configs: bool = False) -> list[dict]:
    w_bytes = g * n * k + math.prod(fm.fp8_scale_shape(g * n, k))
    copies = max(4, -(-MIN_ROTATION_BYTES // w_bytes))
    fp8 = _fp8_copies(g * n, k, device, copies)
    # bf16 copies read twice the bytes, so half as many already defeat L2
    dense = ([(fm.dequantize_fp8(q, s, torch.bfloat16),) for q, s in fp8[: max(4, copies // 2)]]
             if baselines else [])

    def kernel(x, q, s):
        if g == 1:
            return fl.fp8_linear(x[:, 0], q, s, act_quant=act_quant)
        return fl.fp8_linear_grouped(x, q, s, act_quant=act_quant)

    def reference(x, q, s):
        return fl.fp8_linear_reference(x, q, s, n, act_quant=act_quant)

    def bf16_weight(x, w):
        if g == 1:
            return F.linear(x[:, 0], w)
        return torch.einsum("mgk,gnk->mgn", x, w.view(g, n, k))

    out = []
    for m in rows:
        x = torch.randn(m, g, k, device=device, dtype=torch.bfloat16)
        nbytes = w_bytes + 2 * m * g * (k + n)
        shape = f"{name} M={m} N={n} K={k}" + (f" G={g}" if g > 1 else "")
        cases = [("fp8_linear" + ("+act_quant" if act_quant else ""), Rotating(kernel, x, fp8))]
        if baselines:
            cases += [("torch dequant+matmul", Rotating(reference, x, fp8)),
                      ("torch bf16 weight", Rotating(bf16_weight, x, dense))]
        for kernel_name, fn in cases:
            t = median_us(fn)
            row = {"kernel": kernel_name, "shape": shape, "time_us": round(t, 2),
                   "bytes": nbytes, "gbps": round(nbytes / (t * 1e-6) / 1e9, 1)}
            if kernel_name.startswith("fp8_linear"):
                key = (fl.m_bucket(m), g, n, k, torch.bfloat16, act_quant, str(x.device), None)
                heuristic = fl._candidate_configs(key[0], g * n, k, fl._num_sms(x.device))[0]
                row["config"] = str(fl._tuned.get(key, heuristic))
            out.append(with_graph(row, fn))
        if all_configs and m == 1:  # every candidate pinned, timed the same way (cold L2)
            for cfg in fl._candidate_configs(1, g * n, k, fl._num_sms(x.device)):
                fl.pin_config(cfg)
                try:
                    t = median_us(Rotating(kernel, x, fp8))
                finally:
                    fl.pin_config(None)
                out.append({"kernel": "fp8_linear pinned", "shape": shape, "config": str(cfg),
                            "time_us": round(t, 2), "bytes": nbytes,
                            "gbps": round(nbytes / (t * 1e-6) / 1e9, 1)})
    return out


def bench(device: str = "cuda", rows: tuple[int, ...] = ROWS, act_quant: bool = False,
          baselines: bool = True, all_configs: bool = False) -> list[dict]:
    out = []
    for name, (n, k, g) in SHAPES.items():
        out += _bench_shape(name, n, k, g, rows, device, act_quant, baselines, all_configs)
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--act-quant", action="store_true")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--json", help="also write the rows (and copy_gbps) here")
    p.add_argument("--all-configs", action="store_true",
                   help="at M = 1 also time every candidate config pinned (is the tuner's pick "
                        "the fastest cold?)")
    a = p.parse_args(argv)
    copy = copy_gbps(a.device)
    rows = bench(a.device, tuple(a.rows), a.act_quant, not a.no_baselines, a.all_configs)
    print(f"device: {torch.cuda.get_device_name(a.device)}; copy bandwidth {copy:.0f} GB/s")
    print(f"{'kernel':22} {'shape':40} {'us':>9} {'MB':>7} {'GB/s':>7} {'%copy':>6}  config")
    for r in rows:
        print(f"{r['kernel']:22} {r['shape']:40} {r['time_us']:9.2f} {r['bytes'] / 1e6:7.2f} "
              f"{r['gbps']:7.0f} {100 * r['gbps'] / copy:5.0f}%  {r.get('config', '')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(a.device), "copy_gbps": copy,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
