"""The real DeepSeek-V4-Flash configuration on one GPU, with random weights in the real formats.

    python bench/engine_fullsize.py                         # flash, cuda, INT2-G64 experts
    python bench/engine_fullsize.py --experts fp4 --layers 20   # official FP4 experts (the
                                                            # full FP4 model does not fit 141 GB)
    python bench/engine_fullsize.py --config tiny --device cpu --prefill 16 --decode 4

What it does, as a user's `--model` of the INT2 release would run (spec section 4): builds
`Transformer(ModelConfig.flash(), bf16)` on the meta device and materialises every tensor on
the device in its stored format (`engine.random_weights`: FP8 + E8M0 projections, INT2-G64
routed experts in the 43 main layers, FP4 experts in the MTP block, BF16/F32 elsewhere, I64
`tid2eid`); no checkpoint is written or read. Then, at batch 1 with random token ids:
a warm-up on its own state, one prefill of N tokens (`last_only`, as the runtime does) and M
greedy decode steps, each timed with a device synchronisation around it.

Reported: GPU memory (`torch.cuda.memory_allocated` after the build = the weights,
`max_memory_allocated` over the build and over the forwards), build time, prefill time,
decode tokens/s (median step), and the batch-1 roofline of spec section 5: the bytes one
decoded token must read (counted from the model's own stored tensors: every main-layer
weight except the routed experts, 6 routed experts per layer, the head; the embedding row
and the MTP block are not read) over the measured step time, against the H200's 4.8 TB/s
datasheet bandwidth and the 4.22 TB/s device copy measured here (spec section 8).
Prints a table; writes JSON to bench/results/engine_fullsize.json (or --out).

Imports only torch and the engine's model code (no tokenizer, no proxy), so it runs on the
bare device machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ModelConfig
from engine.linear import Linear
from engine.model import Transformer
from engine.random_weights import materialize_random_, stored_tensors

RESULTS = Path(__file__).resolve().parent / "results" / "engine_fullsize.json"
H200_DATASHEET_BPS = 4.8e12  # spec section 5
H200_MEASURED_COPY_BPS = 4.22e12  # spec section 8: device-to-device copy, read + write
SPEC_BYTES_PER_TOKEN_INT2 = 9.64e9  # spec section 5, INT2-G64 experts + FP8/BF16 rest
GIB = 1 << 30


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


def bytes_per_token(model: Transformer) -> dict[str, int]:
    """Bytes a batch-1 decode step reads from the stored weights, by part."""
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


def weight_formats(model: Transformer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Linear):
            counts[str(m.format)] = counts.get(str(m.format), 0) + 1
    return counts


def decode_breakdown(model: Transformer, state, nxt: torch.Tensor, steps: int, sync, cuda: bool,
                     profile_path: Path) -> dict:
    """Wall time per part of a decode step, measured by hooks that synchronise the device
    before and after each part (so launches do not overlap parts), and one torch.profiler
    step: total kernel time against wall time, top operators."""
    from engine.moe import Expert

    spent: dict[str, float] = {}
    starts: dict[int, float] = {}
    handles = []

    def watch(module: torch.nn.Module, part: str) -> None:
        def pre(mod, _inputs):
            sync()
            starts[id(mod)] = time.perf_counter()

        def post(mod, _inputs, _output):
            sync()
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - starts.pop(id(mod))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for layer in model.layers:
        watch(layer.attn, "attention")
        watch(layer.ffn, "moe_total")
        if layer.ffn.shared_experts is not None:
            watch(layer.ffn.shared_experts, "shared_expert")
        for expert in layer.ffn.experts:
            if isinstance(expert, Expert):
                watch(expert, "routed_experts")
    watch(model.head, "head")
    wall = 0.0
    try:
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            logits = model(nxt, state, last_only=True)
            nxt = logits.argmax(-1, keepdim=True)
            sync()
            wall += time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    per_step = {k: v / steps for k, v in spent.items()}
    per_step["moe_routing_and_rest"] = per_step.get("moe_total", 0.0) - per_step.get(
        "routed_experts", 0.0) - per_step.get("shared_expert", 0.0)
    per_step["wall_with_hooks"] = wall / steps
    per_step["other"] = per_step["wall_with_hooks"] - per_step.get("attention", 0.0) - \
        per_step.get("moe_total", 0.0) - per_step.get("head", 0.0)

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        logits = model(nxt, state, last_only=True)
        sync()
    prof_wall = time.perf_counter() - t
    events = prof.key_averages()
    # kernels only: the aten operators' self device time counts the same kernels again
    kernel_us = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC"))
    syncs = {e.key: e.count for e in events
             if "Synchronize" in e.key or e.key in ("aten::nonzero", "aten::item",
                                                    "aten::_local_scalar_dense",
                                                    "aten::unique", "aten::_unique2")}
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = (events.table(sort_by=sort, row_limit=25) + "\n\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=25))
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    profile_path.write_text(text)
    print(events.table(sort_by=sort, row_limit=12), flush=True)
    return {"steps": steps, "per_step_s": per_step,
            "profiled_step": {"wall_s": prof_wall, "kernel_time_s": kernel_us / 1e6,
                              "kernel_launches": launches, "host_syncs": syncs}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["flash", "tiny"], default="flash")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--experts", choices=["int2", "fp4"], default="int2",
                   help="routed experts of the main layers: INT2-G64 (default) or the "
                        "release's packed FP4")
    p.add_argument("--layers", type=int, default=None, help="main layers (default: the config's)")
    p.add_argument("--prefill", type=int, default=64, help="prompt tokens (N)")
    p.add_argument("--decode", type=int, default=16, help="greedy decode steps (M)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up prompt tokens (0: none)")
    p.add_argument("--long-prefill", type=int, default=0,
                   help="then prefill this many tokens on a fresh state (e.g. 2100: past the "
                        "window, several 128-entries, more ratio-4 entries than index_topk)")
    p.add_argument("--long-decode", type=int, default=4, help="decode steps after --long-prefill")
    p.add_argument("--breakdown", type=int, default=0,
                   help="then time this many more decode steps per part (attention, routed "
                        "experts, shared expert, head; synchronising hooks) and profile one "
                        "step with torch.profiler (table to OUT.profile.txt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no per-layer build lines")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    config = build_config(args.config, args.layers)
    print(f"config {args.config}: {config.num_hidden_layers} layers, "
          f"{config.n_routed_experts} experts, hidden {config.hidden_size}; device {device}; "
          f"experts {args.experts}", flush=True)

    # -- build ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(config, dtype=torch.bfloat16)
    meta_s = time.perf_counter() - t0

    def progress(group: str, seconds: float) -> None:
        if not args.quiet:
            mem = f", {torch.cuda.memory_allocated(device) / GIB:.1f} GiB" if cuda else ""
            print(f"  {group}: {seconds:.2f} s{mem}", flush=True)

    t1 = time.perf_counter()
    materialize_random_(model, seed=args.seed, device=device,
                        experts="int2" if args.experts == "int2" else "release",
                        progress=progress)
    sync()
    materialise_s = time.perf_counter() - t1
    weights_bytes = sum(_nbytes(t) for t in stored_tensors(model).values())
    mem: dict[str, float | None] = {"weights_gib": weights_bytes / GIB}
    if cuda:
        mem["allocated_after_build_gib"] = torch.cuda.memory_allocated(device) / GIB
        mem["max_allocated_build_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        mem["device_total_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
        torch.cuda.reset_peak_memory_stats(device)
    print(f"built in {meta_s:.1f} s (meta) + {materialise_s:.1f} s (weights); "
          f"{weights_bytes / GIB:.2f} GiB of stored weights", flush=True)

    g = torch.Generator().manual_seed(args.seed + 1)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(2, config.vocab_size, (1, n), generator=g).to(device)

    max_len = args.prefill + args.decode + 8
    # -- warm-up (own state): allocator, cuBLAS handles, first-call costs ---------------------
    warm_s = None
    if args.warmup:
        t = time.perf_counter()
        st = model.new_state(1, args.warmup + 2, device=device)
        logits = model(tokens(args.warmup), st, last_only=True)
        model(logits.argmax(-1, keepdim=True), st, last_only=True)
        sync()
        warm_s = time.perf_counter() - t
        del st
        print(f"warm-up ({args.warmup} + 1 tokens): {warm_s:.2f} s", flush=True)

    # -- prefill ---------------------------------------------------------------------------
    state = model.new_state(1, max_len, device=device)
    prompt = tokens(args.prefill)
    sync()
    t = time.perf_counter()
    logits = model(prompt, state, last_only=True)
    sync()
    prefill_s = time.perf_counter() - t
    finite = bool(torch.isfinite(logits).all())
    print(f"prefill {args.prefill} tokens: {prefill_s:.2f} s, logits finite {finite}, "
          f"std {logits.float().std().item():.3f}", flush=True)

    # -- greedy decode -----------------------------------------------------------------------
    step_s: list[float] = []
    generated: list[int] = []
    nxt = logits.argmax(-1, keepdim=True)  # [1, 1]
    for _ in range(args.decode):
        sync()
        t = time.perf_counter()
        logits = model(nxt, state, last_only=True)
        nxt = logits.argmax(-1, keepdim=True)
        sync()
        step_s.append(time.perf_counter() - t)
        generated.append(int(nxt.item()))
        finite = finite and bool(torch.isfinite(logits).all())
    breakdown = None
    if args.breakdown:
        breakdown = decode_breakdown(model, state, nxt, args.breakdown, sync, cuda,
                                     args.out.with_suffix(".profile.txt"))
        print("decode breakdown (s per step): " + ", ".join(
            f"{k} {v:.3f}" for k, v in breakdown["per_step_s"].items()), flush=True)

    # a partial record first, in case the optional long prompt runs out of time
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "partial": True, "config": args.config, "experts": args.experts, "memory": mem,
        "build_s": meta_s + materialise_s, "prefill_s": prefill_s, "decode_step_s": step_s,
        "generated": generated, "logits_finite": finite}, indent=2) + "\n")

    # -- optional long prompt: every attention kind at work, then decode at that depth -------
    long = None
    if args.long_prefill:
        del state
        st = model.new_state(1, args.long_prefill + args.long_decode + 8, device=device)
        sync()
        t = time.perf_counter()
        lg = model(tokens(args.long_prefill), st, last_only=True)
        sync()
        long_prefill_s = time.perf_counter() - t
        long_ok = bool(torch.isfinite(lg).all())
        long_steps: list[float] = []
        for _ in range(args.long_decode):
            nl = lg.argmax(-1, keepdim=True)
            sync()
            t = time.perf_counter()
            lg = model(nl, st, last_only=True)
            sync()
            long_steps.append(time.perf_counter() - t)
            long_ok = long_ok and bool(torch.isfinite(lg).all())
        long = {"tokens": args.long_prefill, "prefill_s": long_prefill_s,
                "prefill_tokens_per_s": args.long_prefill / long_prefill_s,
                "decode_step_s": long_steps,
                "decode_tokens_per_s_median": 1 / statistics.median(long_steps)
                if long_steps else None,
                "logits_finite": long_ok}
        print(f"long prefill {args.long_prefill} tokens: {long_prefill_s:.2f} s, then "
              f"{len(long_steps)} decode steps median "
              f"{statistics.median(long_steps) * 1e3 if long_steps else float('nan'):.0f} ms, "
              f"finite {long_ok}", flush=True)
        del st
    if cuda:
        mem["max_allocated_forward_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        mem["max_allocated_gib"] = max(mem["max_allocated_build_gib"],
                                       mem["max_allocated_forward_gib"])
    mem["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    median = statistics.median(step_s) if step_s else float("nan")
    bpt = bytes_per_token(model)
    bound = {
        "bytes_per_token": bpt,
        "bytes_per_token_spec_int2": SPEC_BYTES_PER_TOKEN_INT2,
        "bound_ms_datasheet_4_8TBs": bpt["total"] / H200_DATASHEET_BPS * 1e3,
        "bound_ms_measured_copy_4_22TBs": bpt["total"] / H200_MEASURED_COPY_BPS * 1e3,
        "achieved_GBs": bpt["total"] / median / 1e9 if step_s else None,
    }
    bound["pct_of_bound_datasheet"] = 100 * bound["bound_ms_datasheet_4_8TBs"] / 1e3 / median
    bound["pct_of_bound_measured_copy"] = 100 * bound["bound_ms_measured_copy_4_22TBs"] / 1e3 / median
    result = {
        "config": args.config,
        "layers": config.num_hidden_layers,
        "experts": args.experts,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "seed": args.seed,
        "linear_formats": weight_formats(model),
        "memory": mem,
        "build_s": {"meta": meta_s, "materialise": materialise_s, "total": meta_s + materialise_s},
        "warmup_s": warm_s,
        "prefill": {"tokens": args.prefill, "seconds": prefill_s,
                    "tokens_per_s": args.prefill / prefill_s},
        "decode": {"steps": args.decode, "step_s": step_s, "median_step_s": median,
                   "tokens_per_s_median": 1 / median if step_s else None,
                   "tokens_per_s_mean": len(step_s) / sum(step_s) if step_s else None,
                   "generated": generated},
        "logits_finite": finite,
        "long_prompt": long,
        "decode_breakdown": breakdown,
        "roofline": bound,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def row(k: str, v: str) -> None:
        print(f"| {k:<40} | {v:<44} |")

    print()
    row("what", "value")
    print(f"|{'-' * 42}|{'-' * 46}|")
    row("model", f"{args.config} ({config.num_hidden_layers} layers), experts {args.experts}")
    row("device", result["device"])
    row("stored weights", f"{mem['weights_gib']:.2f} GiB")
    if cuda:
        row("GPU memory after build (allocated)", f"{mem['allocated_after_build_gib']:.2f} GiB")
        row("GPU max_memory_allocated", f"{mem['max_allocated_gib']:.2f} GiB "
            f"(build {mem['max_allocated_build_gib']:.2f}, forwards "
            f"{mem['max_allocated_forward_gib']:.2f})")
    row("host max RSS", f"{mem['host_max_rss_gib']:.2f} GiB")
    row("build time", f"{meta_s + materialise_s:.1f} s ({meta_s:.1f} meta + "
        f"{materialise_s:.1f} weights)")
    row(f"prefill {args.prefill} tokens", f"{prefill_s:.2f} s ({args.prefill / prefill_s:.1f} tok/s)")
    if step_s:
        row(f"decode {args.decode} steps, batch 1, greedy",
            f"{1 / median:.2f} tok/s (median {median * 1e3:.0f} ms/step)")
    row("bytes read per decoded token", f"{bpt['total'] / 1e9:.2f} GB (spec: 9.64 GB)")
    row("batch-1 bound at 4.8 / 4.22 TB/s", f"{bound['bound_ms_datasheet_4_8TBs']:.2f} / "
        f"{bound['bound_ms_measured_copy_4_22TBs']:.2f} ms per token")
    if step_s:
        row("% of bound (4.8 / 4.22 TB/s)", f"{bound['pct_of_bound_datasheet']:.2f}% / "
            f"{bound['pct_of_bound_measured_copy']:.2f}%  "
            f"({bound['achieved_GBs']:.0f} GB/s effective)")
    if long is not None:
        row(f"long prefill {long['tokens']} tokens", f"{long['prefill_s']:.2f} s "
            f"({long['prefill_tokens_per_s']:.1f} tok/s)")
        if long["decode_tokens_per_s_median"]:
            row(f"decode after {long['tokens']} tokens",
                f"{long['decode_tokens_per_s_median']:.2f} tok/s (median)")
        finite = finite and long["logits_finite"]
    row("logits finite", str(finite))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
