"""GGML block GEMV (engine.kernels.gguf_gemv: Q8_0, Q2_K, IQ2_XXS) at ds4's real shapes, on a GPU.

    PYTHONPATH=. python -m bench.kernels.gguf                 # table + bytes per token
    PYTHONPATH=. python -m bench.kernels.gguf --rows 1 --json out.json

For every projection of ds4's GGUF (its GGML type, N x K) and batch M in {1, 8}: the Triton
kernel and the engine's reference path (`F.linear(x, dequantize_ggml(W))`, blocks decoded in
memory per call). Times are triton.testing.do_bench medians; each timed call reads a different
copy of the weight (>= 4 copies, >= 128 MB in all, so L2 holds none). `bytes` is what the op
must move (blocks + x + out). The weights are random bytes with finite f16 scales: every bit
pattern is a valid block, and the kernel's work does not depend on the values.

`bytes_per_token(config)` is what one decoded token reads from ds4's layout at batch 1 (every
main layer's projections, the 6 routed experts of 256 it picks, the head, one embedding row):
with the copy bandwidth it gives the decode roofline in tokens per second.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.kernels._timing import Rotating, copy_gbps, median_us, with_graph
from engine import formats as fm
from engine.config import ModelConfig
from engine.formats import WeightFormat
from engine.gguf import ds4_name
from engine.kernels import gguf_gemv as gg
from engine.make_checkpoint import _DS4_EXPERTS, _DS4_Q8_0, release_layout

Q8, Q2, IQ2 = WeightFormat.Q8_0, WeightFormat.Q2_K, WeightFormat.IQ2_XXS
# name: (format, N, K)
SHAPES = {
    "expert w1/w3": (IQ2, 2048, 4096),
    "expert w2": (Q2, 4096, 2048),
    "wq_a": (Q8, 1024, 4096),
    "wq_b": (Q8, 32768, 1024),
    "wkv": (Q8, 512, 4096),
    "wo_b": (Q8, 4096, 8192),
    "shared w1/w3": (Q8, 2048, 4096),
    "shared w2": (Q8, 4096, 2048),
    "head": (Q8, 129280, 4096),
}
ROWS = (1, 8)
MIN_ROTATION_BYTES = 128 << 20
F16_FIELDS = {Q8: (0,), Q2: (80, 82), IQ2: (0,)}


def random_blocks(fmt: WeightFormat, n: int, k: int, device: str) -> torch.Tensor:
    packed = torch.randint(0, 256, (n, fm.ggml_row_bytes(fmt, k)), dtype=torch.uint8, device=device)
    blocks = packed.view(n, -1, fm.GGML_BLOCKS[fmt][1])
    for offset in F16_FIELDS[fmt]:
        d = (torch.rand(blocks.shape[:-1], device=device) * 1e-3).to(torch.float16)
        blocks[..., offset : offset + 2] = d.view(torch.int16).unsqueeze(-1).view(torch.uint8)
    return packed


def _stored_bytes(fmt: WeightFormat | None, shape: tuple[int, ...], itemsize: int) -> int:
    if fmt is None:
        n = 1
        for s in shape:
            n *= s
        return n * itemsize
    return shape[0] * fm.ggml_row_bytes(fmt, shape[1])


def bytes_per_token(c: ModelConfig | None = None) -> dict[str, int]:
    """Bytes one batch-1 decode step reads from ds4's layout, by kind (main layers only)."""
    c = c or ModelConfig.flash()
    out = {"q8_0": 0, "routed experts": 0, "f16/f32": 0}
    for spec in release_layout(c):
        if spec.name.startswith("mtp."):
            continue
        name, expert = ds4_name(spec.name)
        leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
        if expert is not None:  # K of E experts read per token
            out["routed experts"] += _stored_bytes(_DS4_EXPERTS[leaf], spec.shape, 1) * (
                c.num_experts_per_tok / c.n_routed_experts)
        elif leaf in _DS4_Q8_0:
            out["q8_0"] += _stored_bytes(Q8, spec.shape, 1)
        elif spec.name == "embed.weight":
            out["f16/f32"] += c.hidden_size * 2  # one F16 row
        elif spec.init == "tid2eid":
            out["f16/f32"] += c.num_experts_per_tok * 4  # one I32 row
        else:
            is_int = spec.dtype is not None and not spec.dtype.is_floating_point
            out["f16/f32"] += _stored_bytes(None, spec.shape, 4 if is_int or len(spec.shape) < 2 else 2)
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def bench(device: str = "cuda", rows: tuple[int, ...] = ROWS, baselines: bool = True) -> list[dict]:
    out = []
    for name, (fmt, n, k) in SHAPES.items():
        w_bytes = n * fm.ggml_row_bytes(fmt, k)
        copies = max(4, -(-MIN_ROTATION_BYTES // w_bytes))
        weights = [(random_blocks(fmt, n, k, device),) for _ in range(copies)]  # Rotating's operands
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            nbytes = w_bytes + 2 * m * (k + n)
            shape = f"{name} {fmt.value} M={m} N={n} K={k}"
            cases = [("ggml_linear", Rotating(lambda x, w, f=fmt: gg.ggml_linear(x, w, f), x, weights))]
            if baselines:
                cases.append(("torch decode+matmul", Rotating(
                    lambda x, w, f=fmt: F.linear(x, fm.dequantize_ggml(f, w, x.dtype)), x, weights[:4])))
            for kernel_name, fn in cases:
                t = median_us(fn)  # kernel mode "auto": Triton on CUDA tensors
                out.append(with_graph({"kernel": kernel_name, "shape": shape,
                                       "time_us": round(t, 2), "bytes": nbytes,
                                       "gbps": round(nbytes / (t * 1e-6) / 1e9, 1)}, fn))
        del weights
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--json", help="also write the rows, copy_gbps and bytes_per_token here")
    a = p.parse_args(argv)
    copy = copy_gbps(a.device)
    per_token = bytes_per_token()
    rows = bench(a.device, tuple(a.rows), not a.no_baselines)
    print(f"device: {torch.cuda.get_device_name(a.device)}; copy bandwidth {copy:.0f} GB/s")
    print(f"bytes per token (ds4 layout, batch 1): {per_token} -> roofline "
          f"{copy * 1e9 / per_token['total']:.1f} tok/s")
    print(f"{'kernel':22} {'shape':44} {'us':>9} {'MB':>8} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        print(f"{r['kernel']:22} {r['shape']:44} {r['time_us']:9.2f} {r['bytes'] / 1e6:8.2f} "
              f"{r['gbps']:7.0f} {100 * r['gbps'] / copy:5.0f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(a.device), "copy_gbps": copy,
                       "bytes_per_token": per_token, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
