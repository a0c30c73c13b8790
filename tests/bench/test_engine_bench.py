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


def test_engine_bench_batched_decode_tiny_on_cpu(tmp_path: Path) -> None:
    """Issue 17's aggregate decode: per batch its tok/s, and a bound whose routed-expert bytes
    grow with the distinct experts a batch touches, not with the batch."""
    out = tmp_path / "engine.json"
    bench = _bench()
    saved = bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--contexts", "64",
                        "--prefill", "0", "--profile-steps", "0", "--batches", "1,8",
                        "--batch-context", "40", "--quiet", "--out", str(out)])
    rows = {r["batch"]: r for r in saved["batched"]}
    assert set(rows) == {1, 8} and saved["decode_b8_tok_s"] == rows[8]["tok_s"] > 0
    assert saved["bound_b8_tok_s"] == rows[8]["bound_tok_s"] and saved["decode_b32_tok_s"] is None
    w = saved["weight_bytes_per_token"]
    # batch 1: exactly the batch-1 bytes (K experts a layer) plus one sequence's KV
    assert abs(rows[1]["bytes_per_step"] - (w["total"] + rows[1]["kv_bytes_per_seq"])) < 1
    assert rows[1]["bytes_per_step"] < rows[8]["bytes_per_step"] < 8 * rows[1]["bytes_per_step"]
    c = bench.build_config("tiny", None)
    e, k = c.n_routed_experts, c.num_experts_per_tok
    assert abs(rows[8]["distinct_experts_per_layer"] - e * (1 - (1 - k / e) ** 8)) < 1e-9
    assert rows[1]["distinct_experts_per_layer"] == k


def test_engine_bench_agent_loop_tiny_on_cpu(tmp_path: Path) -> None:
    """Issue 17's --agent-loop: the tool loop through the engine with the prefix cache on and
    off; fp32 so the two runs' greedy tokens must agree exactly (bf16 rounding may flip a
    near-tied token of the random model, see bench/engine.py). Merges into --out."""
    out = tmp_path / "engine.json"
    out.write_text(json.dumps({"decode_b1_4k_tok_s": 1.5}))
    turns, start, gen = 4, 40, 2
    result = _bench().main(["--agent-loop", "--config", "tiny", "--device", "cpu", "--quiet",
                            "--dtype", "fp32", "--agent-turns", str(turns), "--agent-start",
                            str(start), "--agent-end", "100", "--agent-gen", str(gen),
                            "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["decode_b1_4k_tok_s"] == 1.5  # what was there stays
    assert saved["agent_loop_tokens_identical"] is True and result["agent_loop_first_mismatch_turn"] is None
    rows = saved["agent_loop"]
    assert [r["turn"] for r in rows] == list(range(1, turns + 1)) and all(r["same_tokens"] for r in rows)
    assert rows[0]["prompt_tokens"] == start and rows[-1]["prompt_tokens"] <= 100
    assert all(r["ttft_on_s"] > 0 and r["ttft_off_s"] > 0 for r in rows)
    ratio = sum(r["ttft_on_s"] for r in rows[1:]) / sum(r["ttft_off_s"] for r in rows[1:])
    assert abs(saved["agent_loop_ttft_ratio"] - ratio) < 1e-9
    cache = saved["agent_loop_prefix_cache"]
    # every later turn continues the previous one: its prompt + generated tokens but the last
    assert cache["prefix_cache_hits"] == turns - 1 and cache["prefix_cache_misses"] == 1
    assert cache["prefix_cache_tokens_saved"] == sum(r["prompt_tokens"] + gen - 1 for r in rows[:-1])


def test_engine_bench_prefill_throughput_tiny_on_cpu(tmp_path: Path) -> None:
    """--prefill-bench: a real chunked prefill timed (the engine's chunking, here 16-token
    chunks over 40 tokens), its first chunk profiled; prefill_8k_tok_s only for 8192 tokens."""
    out = tmp_path / "engine.json"
    bench = _bench()
    bench.PREFILL_CHUNK = 16
    saved = bench.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--contexts", "64",
                        "--prefill", "0", "--profile-steps", "0", "--batches", "",
                        "--prefill-bench", "40", "--prefill-baseline", "--quiet",
                        "--out", str(out)])
    p = saved["prefill"]
    assert p["reference_tok_s"] > 0 and p["speedup_vs_reference"] > 0
    assert p["tokens"] == 40 and p["chunk"] == 16 and p["profiled_tokens"] == 16
    assert p["seconds"] > 0 and abs(p["tok_s"] - 40 / p["seconds"]) < 1e-6 * p["tok_s"]
    assert p["kernels"] and {"ffn.experts.w1", "attn.wq_b"} <= {r["projection"]
                                                               for r in p["projections"]}
    assert saved["prefill_8k_tok_s"] is None
