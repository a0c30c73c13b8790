"""Count the kernels one decode step would launch on CUDA, per layer and by kind, on the CPU.

    PYTHONPATH=. python -m bench.count_launches [--fp32] [--no-qat] [--reference]

Runs one `engine.decode.DecodeStep` of the tiny configuration (widened to 8 layers: window,
ratio-4 with the indexer, ratio-128) at batch 1 after a short prefill, under mode("triton") with Triton's
CPU interpreter, and counts:

- every Triton launch as one kernel (the aten ops the interpreter runs inside it are not
  counted);
- `engine.decode.linear_f32` (head, compressor projections) as one GEMM, as on CUDA
  (mm with out_dtype=fp32; the CPU branch upcasts x and the weight first);
- every other aten op that would be a CUDA kernel: everything a TorchDispatchMode sees except
  views, metadata and allocations (list below; a GEMM counts one even where cuBLAS splits it).

Each kernel is attributed to the innermost labelled region: attention / compressor /
indexer (the indexer's own compressor included) / moe / hc / norm (attn_norm, ffn_norm and
anything else of the layer outside those) per layer, and head (embedding, hc_head, final norm,
vocabulary projection) outside the layers. The real model's 43 layers are projected from the
tiny model's: its layers plus, for each kind (window, ratio 4, ratio 128), the real model's
extra layers at the count of a tiny layer of that kind that is neither the first (which
makes the rows the step shares) nor the last. The count does not depend on sizes.
The bf16 model is the default (the real weights' dtype: `.float()` round trips are kernels
there and no-ops in fp32). `store_dtype` is patched to the GPU's choice so the interpreter's
fp32 outputs do not add CPU-only casts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# no kernel on CUDA: views, metadata, allocation without a fill, host scalars
FREE = {
    aten.view, aten._unsafe_view, aten.expand, aten.unsqueeze, aten.squeeze, aten.permute,
    aten.t, aten.transpose, aten.select, aten.slice, aten.as_strided, aten.alias, aten.detach,
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.lift_fresh, aten.unbind, aten.split, aten.split_with_sizes, aten.chunk,
    aten.diagonal, aten.view_as_real, aten.view_as_complex, aten._reshape_alias,
    aten.unflatten, aten.flatten, aten.reshape,
    aten.set_, aten.resize_, aten.is_same_size, aten.sym_size, aten.sym_stride,
    aten.sym_numel, aten.sym_storage_offset, aten.dim, aten.stride, aten.size,
}


class _State:
    def __init__(self) -> None:
        self.labels: list[str] = []
        self.layer: int | None = None
        self.in_triton = 0
        self.counts: collections.Counter = collections.Counter()  # (layer, kind) -> kernels
        self.ops: collections.Counter = collections.Counter()  # (layer, kind, op) -> count

    def add(self, op: str, n: int = 1) -> None:
        kind = "head" if self.layer is None else self.labels[-1] if self.labels else "norm"
        self.counts[(self.layer, kind)] += n
        self.ops[(self.layer, kind, op)] += n


class _Counter(TorchDispatchMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.state.in_triton and func.overloadpacket not in FREE and name not in (
                "sym_size", "sym_stride", "_local_scalar_dense"):
            self.state.add(name)
        return out


@contextlib.contextmanager
def _patched(state: _State, model):
    """Label regions of engine.decode and count Triton launches, for the duration."""
    from engine import decode
    from engine.kernels import decode_attention, hc, rmsnorm_rope
    from engine.moe import MoE

    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, new):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, new)

    def labelled(fn, kind, unless=()):
        def wrapper(*a, **k):
            push = not (state.labels and state.labels[-1] in unless)
            if push:
                state.labels.append(kind)
            try:
                return fn(*a, **k)
            finally:
                if push:
                    state.labels.pop()
        return wrapper

    for name, kind, unless in (
        ("attention_decode", "attention", ()),
        ("_side_projections", "compressor", ()),
        ("_compress_step", "compressor", ("indexer",)),
        ("_write_entry", "compressor", ("indexer",)),
        ("_update_index_keys", "indexer", ()),
        ("_index_select", "indexer", ()),
        ("hc_pre", "hc", ()), ("hc_post", "hc", ()), ("hc_post_pre", "hc", ()),
        ("hc_head", "head", ()),
    ):
        if hasattr(decode, name):
            patch(decode, name, labelled(getattr(decode, name), kind, unless))
    patch(MoE, "forward", labelled(MoE.forward, "moe"))

    def one_gemm(fn):  # linear_f32 is one mm(out_dtype=fp32) on CUDA; the CPU branch upcasts
        def wrapper(*a, **k):
            if not state.in_triton:
                state.add("mm(out_dtype)")
            state.in_triton += 1
            try:
                return fn(*a, **k)
            finally:
                state.in_triton -= 1
        return wrapper

    patch(decode, "linear_f32", one_gemm(decode.linear_f32))

    from triton.runtime.interpreter import InterpretedFunction

    real_run = InterpretedFunction.run

    def counted_run(self, *a, **k):  # every kernel file's launches end here, autotuned or not
        if not state.in_triton:
            state.add("triton:" + getattr(self.fn, "__name__", "?"))
        state.in_triton += 1
        try:
            return real_run(self, *a, **k)
        finally:
            state.in_triton -= 1

    patch(InterpretedFunction, "run", counted_run)
    for mod in (decode_attention, hc, rmsnorm_rope):
        patch(mod, "store_dtype", lambda dtype, device: dtype)

    layers = model.layers
    real_iter = type(layers).__iter__

    def tracked_iter(self):
        if self is not layers:
            yield from real_iter(self)
            return
        for i, layer in enumerate(real_iter(self)):
            state.layer = i
            yield layer
        state.layer = None

    patch(type(layers), "__iter__", tracked_iter)
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def count(qat: bool = True, dtype: torch.dtype = torch.bfloat16, kernel_mode: str = "triton",
          prompt_len: int = 37, batch: int = 1) -> tuple[_State, object]:
    """One counted decode step of the tiny model; returns the counts and the config."""
    from engine.cache import BatchState
    from engine.config import ModelConfig
    from engine.decode import DecodeStep
    from engine.kernels import mode
    from engine.kv import SlotPool
    from engine.model import Transformer
    from engine.moe import stack_all_experts

    # the tiny configuration with two more layers, so every attention kind has a layer that
    # is neither its first (which makes the step's shared rows) nor the last (plain hc_post)
    cfg = ModelConfig.tiny().replace(qat=qat, sliding_window=8, num_hidden_layers=8,
                                     compress_ratios=(0, 0, 4, 128, 4, 128, 4, 0, 0))
    model = Transformer(cfg, dtype=dtype).init_random_(0)
    stack_all_experts(model)
    pool = SlotPool(cfg, max_seqs=batch + 1, max_len=256, device="cpu", dtype=dtype)
    step = DecodeStep(model, pool)
    seqs = []
    for _ in range(batch):
        slot = pool.acquire()
        seq = pool.sequence_state(slot)
        model(torch.randint(0, 1000, (1, prompt_len)), BatchState([seq]), last_only=True)
        seqs.append(seq)
    ids = torch.zeros(batch, dtype=torch.int64)
    slots = torch.tensor([s.slot for s in seqs])
    positions = torch.tensor([s.length for s in seqs])
    state = _State()
    with mode(kernel_mode):
        step(ids, slots, positions)  # warm-up: first launches, caches (not counted)
        with _patched(state, model), _Counter(state):
            step(ids, slots, positions)
    return state, cfg


def report(state: _State, cfg, verbose: bool = False) -> dict:
    kinds = ["attention", "compressor", "indexer", "moe", "hc", "norm"]
    nl = cfg.num_hidden_layers
    print(f"{'layer':>5} {'ratio':>5} " + " ".join(f"{k:>10}" for k in kinds) + f" {'total':>6}")
    steady: dict[int, int] = {}  # a layer of that kind that is neither its first nor the last
    seen: set[int] = set()
    layer_total = 0
    for i in range(nl):
        row = [state.counts[(i, k)] for k in kinds]
        r = cfg.compress_ratio(i)
        if r in seen and i < nl - 1:
            steady[r] = sum(row)
        seen.add(r)
        layer_total += sum(row)
        print(f"{i:>5} {r:>5} " + " ".join(f"{n:>10}" for n in row) + f" {sum(row):>6}")
    head = state.counts[(None, "head")]
    print(f"head (embed, hc_head, norm, vocab projection): {head}")
    real = _real_config()
    n_real = collections.Counter(real.compress_ratio(i) for i in range(real.num_hidden_layers))
    n_tiny = collections.Counter(cfg.compress_ratio(i) for i in range(nl))
    total = head + layer_total + sum((n_real[r] - n_tiny[r]) * steady[r] for r in n_real)
    print(f"steady per layer by ratio: {steady}; real model ({real.num_hidden_layers} layers: "
          f"{dict(n_real)}): {total} kernels a step, {total / real.num_hidden_layers:.1f} a layer")
    if verbose:
        for (layer, kind, op), n in sorted(state.ops.items(), key=lambda t: (
                -1 if t[0][0] is None else t[0][0], t[0][1], t[0][2])):
            if layer in (None, 1, 5, 6):
                print(f"  L{layer} {kind:>10} {op:<40} {n}")
    return {"steady": steady, "head": head, "real_total": total}


def _real_config():
    from engine.config import ModelConfig

    return ModelConfig()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fp32", action="store_true", help="fp32 tiny model (the tests' dtype)")
    p.add_argument("--no-qat", action="store_true")
    p.add_argument("--reference", action="store_true",
                   help="count the reference ops behind every launcher instead of Triton")
    p.add_argument("-v", "--verbose", action="store_true", help="ops of layers 1, 5, 6 and the head")
    a = p.parse_args()
    state, cfg = count(qat=not a.no_qat, dtype=torch.float32 if a.fp32 else torch.bfloat16,
                       kernel_mode="reference" if a.reference else "triton")
    report(state, cfg, a.verbose)


if __name__ == "__main__":
    main()
