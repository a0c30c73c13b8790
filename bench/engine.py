"""Batch-1 decode of the real DeepSeek-V4-Flash shapes on one GPU: tok/s at 4K and 32K context
against the memory bound, eager vs CUDA graph, with a per-kernel table.

    python bench/engine.py                          # flash, cuda, INT2-G64 experts, 43 layers (H200)
    python bench/engine.py --layers 20              # fits an 80 GB H100; prints the 43-layer projection
    python bench/engine.py --config tiny --device cpu --steps 2    # smoke test (CI)

What it does (replaces bench/engine_fullsize.py):

1. builds `Transformer(config, bf16)` on the meta device and materialises every tensor on the
   device in its stored format (`engine.random_weights`: FP8 + E8M0 projections, INT2-G64
   routed experts (or `--experts fp4`), BF16/F32 elsewhere); no checkpoint is read;
2. measures the device's copy bandwidth (read + write bytes of a large device-to-device copy,
   as spec section 8 counts it) in the same run;
3. `--prefill N` (default 64): a real prefill of N random tokens through the reference
   `Transformer.forward` into a slot pool, then one fast decode step (`engine.decode`) checked
   against the reference forward on a copy of the state (max relative logit difference);
4. for each context (default 4096 and 32768): a slot pool sized for it whose slot is FILLED
   WITH RANDOM KV, ENTRIES, INDEXER KEYS AND COMPRESSOR ROWS for positions < context - a
   SIMULATED prefill (a real 32K prefill on the reference path would take minutes and
   changes nothing a decode step reads but the values) - then `--steps` greedy decode steps
   through `engine.runner.DecodeRunner` eagerly and replaying a captured CUDA graph (bucket
   1); tok/s = steps / wall time between two device syncs (the tokens stay on the device);
5. the bound: bytes one token reads, counted from the model's own stored tensors (every main
   layer's weights but the routed experts, K routed experts per layer, the head, one
   embedding row) plus the KV state read at that context (window, visible ratio-128 entries,
   top-k ratio-4 entries, indexer keys, compressor rows), over the copy bandwidth;
6. torch.profiler on `--profile-steps` steps at the first context, eager and graph: a kernel
   table (name, calls and device time per step, share of the step) and, eager only, a table
   of weight reads per projection (record_function ranges around each Linear: bytes of the
   stored tensors each call reads, device time, GB/s);
6b. `--batches` (default 8,32 on CUDA): aggregate decode of B sequences at `--batch-context`
   (SIMULATED prefill) through the runner's bucket B; its bound counts every weight once but
   the routed experts of the E (1 - (1 - K/E)^B) distinct experts B uniformly routed tokens
   touch a layer (issue 17: ~44 of 256 at 8, ~136 at 32), plus each sequence's KV;
7. with --layers < 43: the 43-layer projection = (step - head) / layers * 43 + head, the head
   (hc_head + norm + head GEMV) timed alone.

JSON to bench/results/engine.json (or --out): device, layers, decode_b1_4k_tok_s,
decode_b1_32k_tok_s (the graph figure when a graph was captured, else eager; `decode_mode`
says which), bound_b1_tok_s (at the first context), copy_gbps, peak_gib, kernels (rows),
and the rest of what is printed. Imports only torch and the engine (no tokenizer, no proxy),
so it runs on the bare device machine.

`--agent-loop` (issue 17) instead runs a tool loop through `engine.runtime.Engine` (fast
path; this mode also loads the package tokenizer, which the engine's detokenizer needs):
`--agent-turns` turns whose prompt grows from `--agent-start` to `--agent-end` tokens, each
prompt = the previous one + the `--agent-gen` greedy tokens generated + a random "tool
result"; once with the prefix cache on, once off (a fresh engine each). It reports each
turn's time to first token and writes into --out (merged with what is there):
agent_loop_ttft_ratio (turns 2.. summed, cache on / off), agent_loop_tokens_identical, and
agent_loop (per-turn rows).

    python bench/engine.py --agent-loop --layers 20                 # GPU, real shapes (lead)
    python bench/engine.py --agent-loop --config tiny --device cpu \
        --agent-start 40 --agent-end 160 --agent-gen 3 --dtype fp32  # smoke test (CI)

Identical tokens are exact only up to rounding: a cached continuation prefills the new
tokens in other chunks than a full prefill and its cached positions were written by decode
steps, which differ from the reference forward by summation order (engine/decode.py). In
fp32 that is ~1e-6 and greedy tokens match; in bf16 it is ~1e-2 on the random tiny model,
whose top-2 logit margins are of the same size, so a greedy token can flip (the mismatch
turn is reported). A real checkpoint's margins are usually far larger.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import decode, kernels, overlap
from engine.cache import BatchState
from engine.config import RATIO_SPARSE, RATIO_WINDOW, ModelConfig
from engine.decode import DecodeStep, linear_f32
from engine.gguf_random import random_gguf_model
from engine.kernels import fp8_linear, hc
from engine.kernels.hc import hc_head
from engine.kv import SlotPool
from engine.linear import Linear
from engine.model import Transformer
from engine.random_weights import materialize_random_, stored_tensors
from engine.runner import DecodeRunner
from engine.runtime import PREFILL_CHUNK
from engine.sampling import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
FULL_LAYERS = 43
GIB = 1 << 30
GREEDY = SamplingParams(temperature=0)


# ---------------------------------------------------------------------------------------------
# model, bytes
# ---------------------------------------------------------------------------------------------
def build_config(name: str, layers: int | None) -> ModelConfig:
    c = ModelConfig.flash() if name == "flash" else ModelConfig.tiny()
    if layers is not None and layers != c.num_hidden_layers:
        L, mtp = c.num_hidden_layers, c.num_nextn_predict_layers
        ratios = c.compress_ratios[:layers] + c.compress_ratios[L : L + mtp]
        c = c.replace(num_hidden_layers=layers, compress_ratios=ratios,
                      num_hash_layers=min(c.num_hash_layers, layers))
    return c


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes_per_token(model: Transformer) -> dict[str, int]:
    """Bytes a batch-1 decode step reads from the stored weights, by part (the MTP block and
    all but one embedding row are not read)."""
    c = model.config
    parts = {"routed_experts": 0, "attention": 0, "shared_expert": 0, "router": 0,
             "hc_and_norms": 0, "head": 0}
    for layer in model.layers:
        for name, t in stored_tensors(layer).items():
            if name.startswith("ffn.experts."):
                continue  # counted below: K experts per token
            if name.endswith("tid2eid"):
                parts["router"] += c.num_experts_per_tok * t.element_size()  # one row
            elif name.startswith("ffn.shared_experts."):
                parts["shared_expert"] += _nbytes(t)
            elif name.startswith("ffn.gate."):
                parts["router"] += _nbytes(t)
            elif name.startswith("attn."):
                parts["attention"] += _nbytes(t)
            else:
                parts["hc_and_norms"] += _nbytes(t)
        expert = sum(_nbytes(t) for t in stored_tensors(layer.ffn.experts[0]).values())
        parts["routed_experts"] += c.num_experts_per_tok * expert
    top = stored_tensors(model)
    parts["head"] = _nbytes(top["head.weight"])
    parts["hc_and_norms"] += sum(_nbytes(top[n]) for n in
                                 ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"))
    parts["hc_and_norms"] += c.hidden_size * top["embed.weight"].element_size()  # one row
    parts["total"] = sum(parts.values())
    return parts


def kv_bytes_per_token(pool: SlotPool, context: int) -> int:
    """KV state one decode step at `context` reads (what the attention needs, not what the
    reference-op fallback happens to gather)."""
    c = pool.config
    total = 0
    for layer in pool.layers[: c.num_hidden_layers]:
        el = layer.window.element_size()
        total += _nbytes(layer.window[0])
        if layer.ratio == RATIO_WINDOW:
            continue
        n = context // layer.ratio
        total += _nbytes(layer.comp_kv[0]) + _nbytes(layer.comp_score[0])
        if layer.ratio == RATIO_SPARSE:
            total += min(n, c.index_topk) * c.head_dim * el + n * c.index_head_dim * el
            total += _nbytes(layer.index_kv[0]) + _nbytes(layer.index_score[0])
        else:
            total += n * c.head_dim * el
    return total


def weight_formats(model: Transformer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Linear):
            counts[str(m.format)] = counts.get(str(m.format), 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, reps: int) -> float:
        """Seconds per call of fn over reps calls, device synced before and after."""
        self.sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        return (time.perf_counter() - t) / reps


def copy_bandwidth(device: torch.device, clock: Clock) -> float:
    """Device copy bandwidth in bytes/s, read + write counted (spec section 8's convention)."""
    n = (1 << 30) if clock.cuda else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 20 if clock.cuda else 3
    return 2 * n / clock.time(lambda: dst.copy_(src), reps)


def simulate_prefill_(pool: SlotPool, slot: int, context: int, seed: int) -> None:
    """Random finite state for positions < context in `slot` (see the module docstring)."""
    g = torch.Generator(device=pool.device).manual_seed(seed)

    def fill(t: torch.Tensor) -> None:
        t.copy_(torch.randn(t.shape, generator=g, device=pool.device, dtype=torch.float32))

    for layer in pool.layers[: pool.config.num_hidden_layers]:
        fill(layer.window[slot])
        if layer.ratio == RATIO_WINDOW:
            continue
        fill(layer.entries[slot, : context // layer.ratio])
        fill(layer.comp_kv[slot])
        fill(layer.comp_score[slot])
        if layer.ratio == RATIO_SPARSE:
            fill(layer.index_keys[slot, : context // layer.ratio])
            fill(layer.index_kv[slot])
            fill(layer.index_score[slot])


class _Unpatch:
    def __init__(self, original) -> None:
        self.original = original

    def remove(self) -> None:
        decode.linear_f32 = self.original


def _label_linears(model: Transformer, reads: dict[str, list[int]]):
    """Forward hooks opening/closing a profiler range around every Linear call, named by its
    role (`attn.wq_b`, `ffn.experts.w1`, `head`, ...); reads[role] = [calls, bytes]. The
    decode step's `linear_f32` (head, compressors) bypasses the module call: wrapped too."""
    handles = []
    roles: dict[int, tuple[str, int]] = {}
    inside: set[int] = set()  # modules the wrapper already labels (its fallback calls them)
    original = decode.linear_f32

    def labelled(lin, x):
        if id(lin) not in roles:  # a Linear made after the hooks: not labelled
            return original(lin, x)
        role, nbytes = roles[id(lin)]
        handle = torch.ops.profiler._record_function_enter_new(f"linear:{role}", None)
        r = reads.setdefault(role, [0, 0])
        r[0] += 1
        r[1] += nbytes
        inside.add(id(lin))
        try:
            return original(lin, x)
        finally:
            inside.discard(id(lin))
            torch.ops.profiler._record_function_exit._RecordFunction(handle)

    decode.linear_f32 = labelled
    handles.append(_Unpatch(original))
    # the decode step's fused projections (engine.linear.fused_rows) live beside the
    # modules they fuse, as `_decode_*` attributes: labelled as `<owner>.<fusion>`
    fused = [(f"{owner}.{key.removeprefix('_decode_')}", val)
             for owner, m in model.named_modules()
             for key, val in vars(m).items() if key.startswith("_decode_") and isinstance(val, Linear)]
    for name, mod in [*model.named_modules(), *fused]:
        if not isinstance(mod, Linear) or name.startswith("mtp."):
            continue
        parts = name.split(".")
        role = ".".join(p for p in parts if not p.isdigit() and p != "layers")
        nbytes = sum(_nbytes(t) for t in (mod.weight, mod.scale, mod.zero) if t is not None)
        roles[id(mod)] = (role, nbytes)
        box: list = []

        def pre(m, _inp, role=role, nbytes=nbytes, box=box):
            if id(m) in inside:
                return
            box.append(torch.ops.profiler._record_function_enter_new(f"linear:{role}", None))
            r = reads.setdefault(role, [0, 0])
            r[0] += 1
            r[1] += nbytes

        def post(m, _inp, _out, box=box):
            if id(m) in inside:
                return
            torch.ops.profiler._record_function_exit._RecordFunction(box.pop())

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    return handles


def profile_steps(run_step, steps: int, clock: Clock, model: Transformer | None,
                  mode: str) -> tuple[list[dict], list[dict]]:
    """(kernel rows, projection rows) for `steps` calls of run_step under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    reads: dict[str, list[int]] = {}
    handles = _label_linears(model, reads) if model is not None else []
    try:
        clock.sync()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                run_step()
            clock.sync()
    finally:
        for h in handles:
            h.remove()
    events = prof.key_averages()
    if clock.cuda:
        ops = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:  # CPU: the aten operators are the "kernels"
        ops = [e for e in events if e.key.startswith("aten::")]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(time_of(e) for e in ops) or 1.0
    rows = [{"mode": mode, "kernel": e.key, "calls_per_step": e.count / steps,
             "time_us_per_step": time_of(e) / steps, "share": time_of(e) / total,
             "bytes_per_step": None, "gbps": None}
            for e in sorted(ops, key=time_of, reverse=True)]
    parts = []
    for e in events:
        if e.key.startswith("linear:") and e.key[7:] in reads and e.device_type == DeviceType.CPU:
            us = (e.device_time_total if clock.cuda else e.cpu_time_total) / steps
            calls, nbytes = reads[e.key[7:]]
            parts.append({"projection": e.key[7:], "calls_per_step": calls / steps,
                          "bytes_per_step": nbytes / steps, "time_us_per_step": us,
                          "gbps": nbytes / steps / (us * 1e-6) / 1e9 if us else None})
    parts.sort(key=lambda r: r["time_us_per_step"], reverse=True)
    return rows, parts


MODES = ("eager", "graph", "graph_one_stream", "graph_heuristic", "graph_hc_dot",
         "graph_no_pdl", "graph_again")
# the variants, each a graph captured with these switches (None: as the process has them);
# timed at the first context only (graph_one_stream at every one), beside the graph they are
# compared with. graph_heuristic: every FP8 GEMV on its heuristic config, not the tuned one;
# graph_hc_dot: hc_mixes' tl.dot for one token too
VARIANTS = {"graph_one_stream": {"overlap_on": False},
            "graph_heuristic": {"heuristic": True},
            "graph_hc_dot": {"hc_row_sum": False},
            "graph_no_pdl": {"pdl": False}}


@contextlib.contextmanager
def _switched(overlap_on: bool | None = None, pdl: bool | None = None,
              heuristic: bool = False, hc_row_sum: bool | None = None):
    """engine.overlap / PDL / hc's one-token path switched for a capture, and with heuristic
    the FP8 GEMVs' tuned configs set aside; restored after."""
    was = overlap.enabled(), kernels.pdl_enabled(), hc._options["one_token_sum"]
    for value, switch in ((overlap_on, overlap.set_enabled), (pdl, kernels.set_pdl),
                          (hc_row_sum, hc.set_one_token_sum)):
        if value is not None:
            switch(value)
    tuned, autotune = dict(fp8_linear._tuned), fp8_linear._state["autotune"]
    if heuristic:
        fp8_linear._tuned.clear()
        fp8_linear.set_autotune(False)
    try:
        yield
    finally:
        overlap.set_enabled(was[0])
        kernels.set_pdl(was[1])
        hc.set_one_token_sum(was[2])
        if heuristic:
            fp8_linear._tuned.clear()
            fp8_linear._tuned.update(tuned)
            fp8_linear.set_autotune(autotune)


def decode_at(model: Transformer, config: ModelConfig, context: int, args, clock: Clock,
              device: torch.device) -> dict:
    """Eager and graph decode at one context, on a pool sized for it."""
    steps, warm = args.steps, 2
    max_len = context + (warm + steps) * len(MODES) + 2 * args.profile_steps + 8  # and profile
    pool = SlotPool(config, max_seqs=1, max_len=max_len, device=device, dtype=torch.bfloat16)
    slot = pool.acquire()
    simulate_prefill_(pool, slot, context, args.seed + context)
    state = pool.sequence_state(slot)
    state.length = context
    out: dict = {"context": context, "pool_gib": pool.nbytes() / GIB,
                 "kv_bytes_per_token": kv_bytes_per_token(pool, context)}
    runner = DecodeRunner(model, pool, buckets=(1,), graphs=clock.cuda and not args.no_graph)
    errors = runner.capture(kinds=(False,))
    out["capture_errors"] = {str(k): v for k, v in errors.items()}
    ids = torch.full((1,), 2, dtype=torch.int64, device=device)
    current = [runner]

    def one_step() -> None:
        tokens, _ = current[0].decode([state], ids, [GREEDY])
        ids.copy_(tokens)  # stays on the device: no host sync between steps

    # Each variant (VARIANTS) is the same step captured with a switch changed, timed in the
    # same process as the graph it is compared with: graph_one_stream (engine.overlap off,
    # every kernel on one stream), graph_heuristic, graph_hc_dot and graph_no_pdl (without
    # programmatic dependent launch, engine/kernels/__init__.py). graph_again: the first
    # graph once more, last (the spread between two timings of one graph is the noise).
    first = context == args.contexts[0]
    for mode in MODES:
        if mode not in args.modes or (mode != "eager" and not runner.graphs) or (
                mode == "graph_one_stream" and not overlap.enabled()) or (
                "pdl" in mode and not (kernels.pdl_enabled() and kernels.pdl_capable(ids))) or (
                mode == "graph_heuristic" and not fp8_linear._state["autotune"]) or (
                mode not in ("eager", "graph", "graph_one_stream") and not first):
            out[mode] = None
            continue
        if mode in VARIANTS:
            with _switched(**VARIANTS[mode]):
                current[0] = DecodeRunner(model, pool, buckets=(1,), graphs=True)
                current[0].capture(kinds=(False,))
        if mode == "graph_again":
            current[0] = runner
        current[0].use_graphs = mode != "eager"
        for _ in range(warm):
            one_step()
        step_s = clock.time(one_step, steps)
        out[mode] = {"step_ms": step_s * 1e3, "tok_s": 1 / step_s}
        print(f"  context {context:>6}: {mode:<16} {1 / step_s:9.2f} tok/s "
              f"({step_s * 1e3:.2f} ms/step)", flush=True)
    current[0] = runner
    out["finite"] = bool(torch.isfinite(runner.logits[:1]).all())
    if args.profile_steps and context == args.contexts[0]:
        # Under torch.profiler (CUPTI) a replay of the two-stream graph hits an illegal
        # address (H100, torch 2.11 / CUDA 13, reproduced at 2 layers; the same graph replays
        # without a fault when not profiled, and the one-stream graph profiles cleanly), so
        # the kernel table profiles a one-stream graph: the same kernels, run in sequence
        # (the eager step runs on one stream too). And without PDL: a kernel launched early
        # would count its wait for the one before it as its own time.
        with _switched(overlap_on=False, pdl=False):
            runner.use_graphs = False
            k_rows, p_rows = profile_steps(one_step, args.profile_steps, clock, model, "eager")
            if runner.graphs:
                current[0] = DecodeRunner(model, pool, buckets=(1,), graphs=True)
                current[0].capture(kinds=(False,))
                g_rows, _ = profile_steps(one_step, args.profile_steps, clock, None, "graph")
                k_rows += g_rows
        current[0] = runner
        runner.use_graphs = bool(runner.graphs)
        out["kernels"], out["projections"] = k_rows, p_rows
    return out


def expected_distinct_experts(config: ModelConfig, batch: int) -> float:
    """Experts a layer's step touches on average for `batch` tokens routed uniformly at
    random (K of E each): E (1 - (1 - K/E)^B). ~44 of 256 at 8, ~136 at 32 (issue 17)."""
    e, k = config.n_routed_experts, config.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def decode_batch(model: Transformer, config: ModelConfig, batch: int, context: int, args,
                 clock: Clock, device: torch.device) -> dict:
    """Aggregate greedy decode of `batch` sequences, each at `context` (SIMULATED prefill),
    through the runner's bucket for that batch: graph when it captures, else eager."""
    steps, warm = args.steps, 2
    max_len = context + warm + steps + 8
    pool = SlotPool(config, max_seqs=batch, max_len=max_len, device=device, dtype=torch.bfloat16)
    states = []
    for b in range(batch):
        slot = pool.acquire()
        simulate_prefill_(pool, slot, context, args.seed + context + b)
        state = pool.sequence_state(slot)
        state.length = context
        states.append(state)
    runner = DecodeRunner(model, pool, buckets=(batch,), graphs=clock.cuda and not args.no_graph)
    errors = runner.capture(kinds=(False,))
    runner.use_graphs = bool(runner.graphs)
    ids = torch.full((batch,), 2, dtype=torch.int64, device=device)

    def one_step() -> None:
        tokens, _ = runner.decode(states, ids, [GREEDY] * batch)
        ids.copy_(tokens)

    for _ in range(warm):
        one_step()
    step_s = clock.time(one_step, steps)
    mode = "graph" if runner.use_graphs else "eager"
    print(f"  batch {batch:>3} at context {context}: {mode:<5} {batch / step_s:9.1f} tok/s "
          f"aggregate ({step_s * 1e3:.2f} ms/step)", flush=True)
    return {"batch": batch, "context": context, "mode": mode, "step_ms": step_s * 1e3,
            "tok_s": batch / step_s, "pool_gib": pool.nbytes() / GIB,
            "kv_bytes_per_seq": kv_bytes_per_token(pool, context),
            "capture_errors": {str(k): v for k, v in errors.items()}}


def batch_bytes_per_step(w_bytes: dict[str, int], config: ModelConfig, layers: int,
                         batch: int, kv_per_seq: int) -> float:
    """Bytes a batched step reads: every weight once, but the routed experts of the distinct
    experts the batch touches (uniform routing), plus each sequence's KV."""
    per_layer_expert = w_bytes["routed_experts"] / (layers * config.num_experts_per_tok)
    distinct = expected_distinct_experts(config, batch)
    return (w_bytes["total"] - w_bytes["routed_experts"]
            + layers * distinct * per_layer_expert + batch * kv_per_seq)


def prefill_check(model: Transformer, config: ModelConfig, n: int, clock: Clock,
                  device: torch.device, seed: int) -> dict:
    """A real prefill of n tokens into a pool slot, then one fast step vs the reference."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, config.vocab_size, (1, n), generator=g).to(device)
    pool = SlotPool(config, max_seqs=1, max_len=n + 8, device=device, dtype=torch.bfloat16)
    state = pool.sequence_state(pool.acquire())
    clock.sync()
    t = time.perf_counter()
    logits = model(prompt, BatchState([state]), last_only=True)
    clock.sync()
    prefill_s = time.perf_counter() - t
    nxt = logits.argmax(-1)
    ref_state = state.clone()
    ref = model(nxt[:, None], BatchState([ref_state]), last_only=True)
    step = DecodeStep(model, pool)
    slots = torch.tensor([state.slot], device=device)
    positions = torch.tensor([state.length], device=device)
    # the slot as the prefill left it: the second step below starts from the same state
    saved = [(t, t[state.slot].clone()) for layer in pool.layers for t in vars(layer).values()
             if isinstance(t, torch.Tensor)]
    fast = step(nxt, slots, positions)
    for t, before in saved:
        t[state.slot] = before
    with kernels.mode("reference"):  # the same decode step on torch ops: the bf16 floor
        fast_ref = step(nxt, slots, positions)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    same = bool(fast.argmax(-1).eq(ref.argmax(-1)).all())
    out = {"tokens": n, "seconds": prefill_s, "fast_vs_reference_max_rel": rel(fast, ref),
           "reference_kernels_vs_reference_max_rel": rel(fast_ref, ref),
           "fast_vs_reference_kernels_max_rel": rel(fast, fast_ref), "same_greedy_token": same}
    print(f"real prefill {n} tokens: {prefill_s:.2f} s; max rel logit diff of one decode step: "
          f"Triton kernels vs the reference forward {out['fast_vs_reference_max_rel']:.2e}, "
          f"the decode step on torch ops vs the reference forward (bf16 floor) "
          f"{out['reference_kernels_vs_reference_max_rel']:.2e}, Triton vs torch-op step "
          f"{out['fast_vs_reference_kernels_max_rel']:.2e}; same greedy token {same}", flush=True)
    return out


def prefill_throughput(model: Transformer, config: ModelConfig, n: int, clock: Clock,
                       device: torch.device, seed: int, baseline: bool = False) -> dict:
    """A real prefill of n random tokens as the engine runs one (engine.runtime: chunks of
    PREFILL_CHUNK through the model into a pool slot), timed; then its first chunk again
    under the profiler: where a prefill's time goes (issue 17's prefill target)."""
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(2, config.vocab_size, (1, n), generator=g).to(device)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        pool = SlotPool(config, max_seqs=1, max_len=tokens.shape[1] + 8, device=device,
                        dtype=torch.bfloat16)
        state = BatchState([pool.sequence_state(pool.acquire())])
        for start in range(0, tokens.shape[1], PREFILL_CHUNK):
            logits = model(tokens[:, start : start + PREFILL_CHUNK], state, last_only=True)
        return logits

    # the fast path's prefill against the reference path's on a prefill-sized chunk (more
    # tokens than the decode kernels take: the grouped expert kernels), which also compiles
    # and tunes the first launches outside the timing
    check = prompt[:, : min(n, 256)]
    fast = run(check).float()
    with kernels.mode("reference"):
        ref = run(check).float()
    versus = {"tokens": check.shape[1],
              "rel_max": float((fast - ref).abs().max() / ref.abs().max()),
              "same_argmax": bool(fast.argmax(-1).eq(ref.argmax(-1)).all())}
    print(f"prefill of {check.shape[1]} tokens, fast vs reference path: last logits max diff "
          f"{versus['rel_max']:.3g} of the largest, argmax equal: {versus['same_argmax']}",
          flush=True)
    clock.sync()
    t = time.perf_counter()
    run(prompt)
    clock.sync()
    seconds = time.perf_counter() - t
    reference_s = None
    if baseline:  # the same prefill on the reference path, in this process (the ratio)
        with kernels.mode("reference"):
            clock.sync()
            t = time.perf_counter()
            run(prompt)
            clock.sync()
            reference_s = time.perf_counter() - t
        print(f"the same prefill on the reference path: {reference_s:.2f} s, "
              f"{n / reference_s:.0f} tok/s ({reference_s / seconds:.1f}x slower)", flush=True)
    chunk = prompt[:, : min(n, PREFILL_CHUNK)]
    kernel_rows, projection_rows = profile_steps(lambda: run(chunk), 1, clock, model, "prefill")
    print(f"real prefill {n} tokens (chunks of {PREFILL_CHUNK}): {seconds:.2f} s, "
          f"{n / seconds:.0f} tok/s; its first chunk's largest kernels:", flush=True)
    for r in kernel_rows[:12]:
        print(f"  {r['time_us_per_step'] / 1e3:9.2f} ms  {r['share']:6.1%}  "
              f"{r['calls_per_step']:6.0f} calls  {r['kernel'][:90]}", flush=True)
    return {"tokens": n, "chunk": PREFILL_CHUNK, "seconds": seconds, "tok_s": n / seconds,
            "fast_vs_reference": versus,
            "reference_tok_s": n / reference_s if reference_s else None,
            "speedup_vs_reference": reference_s / seconds if reference_s else None,
            "profiled_tokens": chunk.shape[1], "kernels": kernel_rows[:40],
            "projections": projection_rows}


def merge_into(out: Path, result: dict) -> dict:
    """Update the JSON at `out` with `result` (the other keys of an earlier run stay)."""
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved.update(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def prefill_only(args, config: ModelConfig, model: Transformer, clock: Clock,
                 device: torch.device, check: dict | None, speed: dict) -> dict:
    """`--prefill-bench N --contexts '' --batches ''`: the prefill figures alone, merged into
    --out (a shortened model's tok/s projected to 43 layers: prefill time is per layer)."""
    L = config.num_hidden_layers
    result = {"device": torch.cuda.get_device_name(device) if clock.cuda else "cpu",
              "layers": L, "experts": args.experts, "prefill_check": check, "prefill": speed,
              "prefill_tok_s_43_layers": (speed["tok_s"] * L / FULL_LAYERS
                                          if args.config == "flash" else None),
              "prefill_8k_tok_s": speed["tok_s"] if speed["tokens"] == 8192 else None}
    projected = result["prefill_tok_s_43_layers"]
    print(f"prefill {speed['tokens']} tokens: {speed['tok_s']:.0f} tok/s at {L} layers"
          + (f", {projected:.0f} tok/s projected to {FULL_LAYERS}" if projected else ""), flush=True)
    return merge_into(args.out, result)


def head_time(model: Transformer, clock: Clock, device: torch.device) -> float:
    c = model.config
    h = torch.randn(1, c.hc_mult, c.hidden_size, device=device).to(model.dtype)

    def head() -> None:
        y = hc_head(h, model.hc_head_fn, model.hc_head_scale, model.hc_head_base, c,
                    norm=(model.norm.weight, model.norm.eps))
        linear_f32(model.head, y).argmax(-1)  # the fast path's head (the norm fused)

    head()
    return clock.time(head, 10 if clock.cuda else 2)


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# agent loop: time to first token with the prefix cache on and off
# ---------------------------------------------------------------------------------------------
def agent_prompts(args, vocab: int) -> tuple[list[int], list[list[int]]]:
    """The first prompt and each later turn's tool result, random ids below 1000 (plain
    tokens: no EOS or special ids, which a real tool result would not hold either)."""
    g = torch.Generator().manual_seed(args.seed)
    turns = args.agent_turns
    grow = max(0, (args.agent_end - args.agent_start) // max(1, turns - 1) - args.agent_gen)
    ids = torch.randint(2, min(vocab, 1000), (args.agent_start + turns * grow,), generator=g)
    first, rest = ids[: args.agent_start].tolist(), ids[args.agent_start :].tolist()
    return first, [rest[i * grow : (i + 1) * grow] for i in range(turns - 1)]


def run_agent_loop(engine, first: list[int], results: list[list[int]], gen: int,
                   clock: Clock) -> tuple[list[float], list[list[int]]]:
    import asyncio

    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)

    async def turn(prompt: list[int]) -> tuple[float, list[int]]:
        clock.sync()
        t = time.perf_counter()
        ttft, out = None, []
        async for token in engine.generate(prompt, params):
            if ttft is None:
                ttft = time.perf_counter() - t
            out.append(token)
        return ttft, out

    async def loop() -> tuple[list[float], list[list[int]]]:
        prompt, ttfts, outs = list(first), [], []
        for i in range(len(results) + 1):
            ttft, out = await turn(prompt)
            ttfts.append(ttft)
            outs.append(out)
            if i < len(results):
                prompt = prompt + out + results[i]
        return ttfts, outs

    return asyncio.run(loop())


def agent_loop(model: Transformer, config: ModelConfig, args, clock: Clock,
               device: torch.device) -> dict:
    import gc

    from dsml.tokenizer import load_tokenizer
    from engine.runtime import Engine

    first, results = agent_prompts(args, config.vocab_size)
    max_len = args.agent_start + sum(len(r) + args.agent_gen for r in results) + args.agent_gen
    runs = {}
    for on in (True, False):
        engine = Engine(model, load_tokenizer(), device, max_seq_len=max_len, max_batch_size=1,
                        engine_path="fast", capture_graphs=clock.cuda, prefix_cache=on)
        try:
            ttfts, outs = run_agent_loop(engine, first, results, args.agent_gen, clock)
            runs[on] = (ttfts, outs, engine.stats())
        finally:
            engine.close()
            del engine
            gc.collect()
            if clock.cuda:
                torch.cuda.empty_cache()
    (on_t, on_out, on_stats), (off_t, off_out, _) = runs[True], runs[False]
    prompt_len, rows = len(first), []
    for i in range(len(on_t)):
        rows.append({"turn": i + 1, "prompt_tokens": prompt_len, "ttft_on_s": on_t[i],
                     "ttft_off_s": off_t[i], "same_tokens": on_out[i] == off_out[i]})
        prompt_len += args.agent_gen + (len(results[i]) if i < len(results) else 0)
    later_on, later_off = sum(on_t[1:]), sum(off_t[1:])
    mismatch = next((r["turn"] for r in rows if not r["same_tokens"]), None)
    return {"agent_loop_ttft_ratio": later_on / later_off if later_off else None,
            "agent_loop_tokens_identical": mismatch is None,
            "agent_loop_first_mismatch_turn": mismatch,
            "agent_loop_prefix_cache": {k: v for k, v in on_stats.items()
                                        if k.startswith("prefix_cache_")},
            "agent_loop": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["flash", "tiny"], default="flash")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--experts", choices=["int2", "fp4", "gguf"], default="int2",
                   help="routed experts of the main layers: INT2-G64 (default) or the release's "
                        "FP4; gguf: every tensor in ds4's GGUF types (engine/gguf_random.py: "
                        "IQ2_XXS / Q2_K experts, Q8_0 attention and head, F16 elsewhere)")
    p.add_argument("--layers", type=int, default=None, help="main layers (default: the config's)")
    p.add_argument("--contexts", default="4096,32768", help="decode contexts, comma separated")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per context and mode")
    p.add_argument("--batches", default=None,
                   help="aggregate decode at these batch sizes, comma separated ('' for none; "
                        "default 8,32 on CUDA, none on the CPU)")
    p.add_argument("--batch-context", type=int, default=4096, help="context of each batched sequence")
    p.add_argument("--prefill", type=int, default=64,
                   help="real prefill tokens for the fast-vs-reference check (0: skip)")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps (0: no profile)")
    p.add_argument("--prefill-bench", type=int, default=0,
                   help="time a real prefill of this many tokens, and profile its first chunk "
                        "(0: none; 8192 gives prefill_8k_tok_s)")
    p.add_argument("--prefill-baseline", action="store_true",
                   help="with --prefill-bench: also time the same prefill on the reference "
                        "path in this process (slow: the per-expert loop) and print the ratio")
    p.add_argument("--no-graph", action="store_true", help="eager only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overlap", action="store_true",
                   help="every kernel on one stream (engine.overlap off), no graph_one_stream row")
    p.add_argument("--no-autotune", action="store_true",
                   help="FP8 GEMVs take their heuristic configs (the same in every process)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="decode rows to time, comma separated (default all: " + ", ".join(MODES)
                        + "; the variants only at the first context)")
    p.add_argument("--no-pdl", action="store_true",
                   help="no programmatic dependent launch in the graphs (engine/kernels/"
                        "__init__.py), no graph_no_pdl row")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no per-layer build lines")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="activations and BF16-stored tensors (fp32: CPU checks of exactness)")
    p.add_argument("--agent-loop", action="store_true",
                   help="only the tool-loop TTFT with the prefix cache on vs off (issue 17)")
    p.add_argument("--agent-turns", type=int, default=10)
    p.add_argument("--agent-start", type=int, default=8192, help="first prompt's tokens")
    p.add_argument("--agent-end", type=int, default=40960, help="last prompt's tokens (about)")
    p.add_argument("--agent-gen", type=int, default=32, help="greedy tokens generated per turn")
    args = p.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    if args.batches is None:
        args.batches = "8,32" if args.device.startswith("cuda") else ""
    args.batches = [int(x) for x in args.batches.split(",") if x]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    if args.no_autotune:
        fp8_linear.set_autotune(False)
    if args.no_overlap:
        overlap.set_enabled(False)
    if args.no_pdl:
        kernels.set_pdl(False)
    config = build_config(args.config, args.layers)
    if args.experts == "gguf":
        config = config.replace(num_nextn_predict_layers=0)  # ds4's file has no MTP block
    L = config.num_hidden_layers
    print(f"config {args.config}: {L} layers, experts {args.experts}, device {device}", flush=True)

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.experts != "gguf":
        with torch.device("meta"):
            model = Transformer(config, dtype=dtype)

    def progress(group: str, seconds: float) -> None:
        if not args.quiet:
            mem = f", {torch.cuda.memory_allocated(device) / GIB:.1f} GiB" if clock.cuda else ""
            print(f"  {group}: {seconds:.2f} s{mem}", flush=True)

    t = time.perf_counter()
    if args.experts == "gguf":
        model = random_gguf_model(config, device, seed=args.seed, dtype=dtype)
    else:
        materialize_random_(model, seed=args.seed, device=device,
                            experts="int2" if args.experts == "int2" else "release",
                            progress=progress)
    clock.sync()
    build_s = time.perf_counter() - t
    weights_gib = sum(_nbytes(x) for x in stored_tensors(model).values()) / GIB
    print(f"built in {build_s:.1f} s: {weights_gib:.2f} GiB of stored weights", flush=True)

    if args.agent_loop:
        result = {"config": args.config, "layers": L, "experts": args.experts, "dtype": args.dtype,
                  "device": torch.cuda.get_device_name(device) if clock.cuda else "cpu",
                  **agent_loop(model, config, args, clock, device)}
        print("\n| turn | prompt tokens | TTFT on (s) | TTFT off (s) | same tokens |")
        print("|---|---|---|---|---|")
        for r in result["agent_loop"]:
            print(f"| {r['turn']} | {r['prompt_tokens']} | {r['ttft_on_s']:.3f} | "
                  f"{r['ttft_off_s']:.3f} | {r['same_tokens']} |")
        print(f"TTFT ratio (turns 2.., on / off): {result['agent_loop_ttft_ratio']:.3f}; "
              f"tokens identical: {result['agent_loop_tokens_identical']}")
        return merge_into(args.out, result)

    copy_bps = copy_bandwidth(device, clock)
    print(f"copy bandwidth (read + write): {copy_bps / 1e9:.0f} GB/s", flush=True)
    if clock.cuda:
        torch.cuda.empty_cache()

    with torch.inference_mode():
        prefill = prefill_check(model, config, args.prefill, clock, device, args.seed) \
            if args.prefill else None
        prefill_speed = prefill_throughput(model, config, args.prefill_bench, clock, device,
                                           args.seed, args.prefill_baseline) \
            if args.prefill_bench else None
        if prefill_speed and not args.contexts and not args.batches:
            return prefill_only(args, config, model, clock, device, prefill, prefill_speed)
        print("decode, batch 1 (prefill SIMULATED: the pool slot holds random kv/entries for "
              "positions < context):", flush=True)
        runs = [decode_at(model, config, ctx, args, clock, device) for ctx in args.contexts]
        head_s = head_time(model, clock, device)
        if args.batches:
            print(f"decode, batches {args.batches} at context {args.batch_context} (SIMULATED "
                  "prefill):", flush=True)
        batched = [decode_batch(model, config, b, args.batch_context, args, clock, device)
                   for b in args.batches]

    w_bytes = weight_bytes_per_token(model)
    for run in runs:
        run["bytes_per_token"] = w_bytes["total"] + run["kv_bytes_per_token"]
        run["bound_tok_s"] = copy_bps / run["bytes_per_token"]
        best = run["graph"] or run["eager"]
        run["decode_mode"] = "graph" if run["graph"] else "eager"
        run["tok_s"] = best["tok_s"]
        run["pct_of_bound"] = 100 * best["tok_s"] / run["bound_tok_s"]
        run["achieved_gbps"] = run["bytes_per_token"] * best["tok_s"] / 1e9
        if L < FULL_LAYERS:
            step = 1 / best["tok_s"]
            per_layer = (step - head_s) / L
            proj_bytes = (run["bytes_per_token"] - w_bytes["head"]) / L * FULL_LAYERS + w_bytes["head"]
            run["projection_43"] = {"per_layer_ms": per_layer * 1e3,
                                    "step_ms": (per_layer * FULL_LAYERS + head_s) * 1e3,
                                    "tok_s": 1 / (per_layer * FULL_LAYERS + head_s),
                                    "bound_tok_s": copy_bps / proj_bytes}

    for run in batched:
        run["bytes_per_step"] = batch_bytes_per_step(w_bytes, config, L, run["batch"],
                                                     run["kv_bytes_per_seq"])
        run["bound_tok_s"] = run["batch"] * copy_bps / run["bytes_per_step"]
        run["pct_of_bound"] = 100 * run["tok_s"] / run["bound_tok_s"]
        run["distinct_experts_per_layer"] = expected_distinct_experts(config, run["batch"])
    by_batch = {r["batch"]: r for r in batched}

    if clock.cuda:
        peak = torch.cuda.max_memory_allocated(device) / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # host RSS
    by_ctx = {r["context"]: r for r in runs}
    first = runs[0]
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if clock.cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "layers": L,
        "experts": args.experts,
        "fp8_autotune": not args.no_autotune,
        "overlap": not args.no_overlap,
        "linear_formats": weight_formats(model),
        "weights_gib": weights_gib,
        "build_s": build_s,
        "simulated_prefill": True,
        "decode_mode": first["decode_mode"],
        "decode_b1_4k_tok_s": by_ctx[4096]["tok_s"] if 4096 in by_ctx else None,
        "decode_b1_32k_tok_s": by_ctx[32768]["tok_s"] if 32768 in by_ctx else None,
        "bound_b1_tok_s": first["bound_tok_s"],
        **{f"decode_b{b}_tok_s": by_batch[b]["tok_s"] if b in by_batch else None for b in (8, 32)},
        **{f"bound_b{b}_tok_s": by_batch[b]["bound_tok_s"] if b in by_batch else None
           for b in (8, 32)},
        "batched": batched,
        "copy_gbps": copy_bps / 1e9,
        "peak_gib": peak,
        "peak_is": "torch.cuda.max_memory_allocated" if clock.cuda else "host max RSS",
        "weight_bytes_per_token": w_bytes,
        "head_ms": head_s * 1e3,
        "prefill_check": prefill,
        "prefill": prefill_speed,
        "prefill_8k_tok_s": prefill_speed["tok_s"] if prefill_speed and
        prefill_speed["tokens"] == 8192 else None,
        "contexts": [{k: v for k, v in r.items() if k not in ("kernels", "projections")}
                     for r in runs],
        "kernels": first.get("kernels", []),
        "projections": first.get("projections", []),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("\n| context | mode | tok/s | ms/step | bound tok/s | % of bound | GB/s | 43-layer tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        for mode in MODES:
            if r.get(mode) is None:
                continue
            proj = r.get("projection_43")
            pt = (f"{1 / ((1 / r[mode]['tok_s'] - head_s) / L * FULL_LAYERS + head_s):.1f}"
                  if proj else "-")
            print(f"| {r['context']} | {mode} | {r[mode]['tok_s']:.2f} | {r[mode]['step_ms']:.2f} | "
                  f"{r['bound_tok_s']:.1f} | {100 * r[mode]['tok_s'] / r['bound_tok_s']:.1f}% | "
                  f"{r['bytes_per_token'] * r[mode]['tok_s'] / 1e9:.0f} | {pt} |")
        if r["capture_errors"]:
            print(f"  graph capture failed at {r['context']}: {r['capture_errors']}")
    print(f"\nbytes per token {first['bytes_per_token'] / 1e9:.3f} GB at context {first['context']}"
          f" (weights {w_bytes['total'] / 1e9:.3f}); copy {copy_bps / 1e9:.0f} GB/s; peak "
          f"{peak:.2f} GiB ({result['peak_is']}); head {head_s * 1e3:.2f} ms")
    if batched:
        print("\n| batch | context | mode | aggregate tok/s | ms/step | distinct experts/layer "
              "| bound tok/s | % of bound |")
        print("|---|---|---|---|---|---|---|---|")
        for r in batched:
            print(f"| {r['batch']} | {r['context']} | {r['mode']} | {r['tok_s']:.1f} | "
                  f"{r['step_ms']:.2f} | {r['distinct_experts_per_layer']:.0f} | "
                  f"{r['bound_tok_s']:.0f} | {r['pct_of_bound']:.1f}% |")
    for mode in ("eager", "graph"):
        rows = [k for k in result["kernels"] if k["mode"] == mode][:15]
        if rows:
            print(f"\ntop kernels, {mode} (per step):")
            for k in rows:
                print(f"  {k['time_us_per_step']:10.1f} us {100 * k['share']:5.1f}%  "
                      f"x{k['calls_per_step']:<6g} {k['kernel'][:90]}")
    if result["projections"]:
        print("\nweight reads per projection, eager (per step):")
        for r in result["projections"][:12]:
            gbps = f"{r['gbps']:.0f}" if r["gbps"] else "-"
            print(f"  {r['projection']:<28} {r['bytes_per_step'] / 1e6:9.1f} MB "
                  f"{r['time_us_per_step']:10.1f} us {gbps:>7} GB/s")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
