"""Every kernel's own GPU benchmark at real shapes, in one table against the copy bandwidth.

    PYTHONPATH=. python -m bench.kernels              # cuda: every kernel benchmark found
    PYTHONPATH=. python -m bench.kernels --only fp8   # those whose file name contains "fp8"

The kernel files provide the measurements (issue 15's plan): a `bench(device) -> list[dict]`
in `bench/kernels/<op>.py` or in the kernel's test file `tests/engine/kernels/test_<op>.py`,
each row {kernel, shape, time_us, bytes, gbps} timed with triton.testing.do_bench (median)
over rotated weight copies. This script finds them, runs them, measures the device's copy
bandwidth (read + write, as bench/engine.py does) and adds each row's share of it. JSON to
bench/results/kernels.json (or --out).

Under TRITON_INTERPRET=1 the kernels run in the interpreter: the figures would be
meaningless on a GPU, so the script refuses that combination.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.kernels._timing import copy_gbps  # noqa: E402 (after the path)

RESULTS = REPO / "bench" / "results" / "kernels.json"


def sources() -> list[Path]:
    mine = [p for p in sorted((REPO / "bench" / "kernels").glob("*.py"))
            if not p.name.startswith("__")]
    return mine + sorted((REPO / "tests" / "engine" / "kernels").glob("test_*.py"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_kernel_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default="", help="substring of the file names to run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench.kernels times kernels on a GPU (--device cuda)")
    rows, errors = [], {}
    for path in sources():
        if args.only not in path.name:
            continue
        try:
            module = load(path)
            if not hasattr(module, "bench"):
                continue
            if os.environ.get("TRITON_INTERPRET") == "1":
                raise RuntimeError("TRITON_INTERPRET=1 is set (by this module or the "
                                   "environment): interpreter timings mean nothing")
            for row in module.bench(str(device)):
                rows.append({"source": str(path.relative_to(REPO)), **row})
        except Exception:
            errors[str(path.relative_to(REPO))] = traceback.format_exc(limit=3)
            print(f"{path.name}: failed\n{errors[str(path.relative_to(REPO))]}", flush=True)
    bw = copy_gbps(device)
    for row in rows:
        gbps = row.get("gbps")
        row["pct_of_copy"] = 100 * gbps / bw if gbps else None
        if row.get("graph_gbps"):
            row["graph_pct_of_copy"] = 100 * row["graph_gbps"] / bw
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "copy_gbps": bw, "kernels": rows, "errors": errors}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}: copy {bw:.0f} GB/s (read + write)\n")
    # "graph": the kernel's calls replayed in one CUDA graph (the decode step's setting);
    # "time": single launches, which for microsecond kernels mostly time the CPU's launch
    print("| kernel | shape | time us | graph us | MB | GB/s (graph) | % of copy (graph) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "-"
        g_us = r.get("graph_us")
        best = r.get("graph_gbps") or r.get("gbps")
        gbps = f"{best:.0f}" if best else "-"
        pct = f"{100 * best / bw:.0f}%" if best else "-"
        print(f"| {r.get('kernel')} | {r.get('shape')} | {r.get('time_us', float('nan')):.1f} | "
              f"{'-' if g_us is None else f'{g_us:.1f}'} | {mb} | {gbps} | {pct} |")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
