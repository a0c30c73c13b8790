"""bench/engine.py in its tiny CPU configuration (the CI smoke test): it runs end to end and
writes the fields the issue asks for, with figures that are at least self-consistent.

Not a speed check: a CPU decode of a random tiny model says nothing about the GPU figures.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "bench" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_bench_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    result = _bench().main(["--config", "tiny", "--device", "cpu", "--steps", "2",
                            "--contexts", "4096,32768", "--prefill", "8", "--profile-steps", "1",
                            "--quiet", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["layers"] == result["layers"] == 6
    for key in ("device", "decode_b1_4k_tok_s", "decode_b1_32k_tok_s", "bound_b1_tok_s",
                "copy_gbps", "peak_gib"):
        assert isinstance(saved[key], (int, float, str)) and saved[key], key
    assert saved["simulated_prefill"] is True and saved["decode_mode"] == "eager"  # no graphs on CPU
    ctx = {c["context"]: c for c in saved["contexts"]}
    assert ctx[4096]["finite"] and ctx[32768]["finite"]
    # the longer context reads more KV; the bound is copy bandwidth over those bytes
    assert ctx[32768]["kv_bytes_per_token"] > ctx[4096]["kv_bytes_per_token"] > 0
    for c in ctx.values():
        assert abs(c["bound_tok_s"] - saved["copy_gbps"] * 1e9 / c["bytes_per_token"]) < 1e-6 * c["bound_tok_s"]
        assert "projection_43" in c and c["projection_43"]["tok_s"] < c["tok_s"]  # 43 > 6 layers
    assert saved["kernels"] and abs(sum(k["share"] for k in saved["kernels"]) - 1) < 1e-6
    roles = {p["projection"] for p in saved["projections"]}
    assert {"head", "attn.wq_b", "ffn.experts.w1"} <= roles
    head = next(p for p in saved["projections"] if p["projection"] == "head")
    assert head["bytes_per_step"] == saved["weight_bytes_per_token"]["head"]  # one head read
    check = saved["prefill_check"]
    assert check["same_greedy_token"] and check["fast_vs_reference_max_rel"] < 0.05  # bf16
