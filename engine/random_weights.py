"""Random weights in the release's stored formats, made directly on a device from a seed.

    with torch.device("meta"):
        model = Transformer(ModelConfig.flash(), dtype=torch.bfloat16)
    materialize_random_(model, seed=0, device="cuda", experts="int2")

This is what `engine.weights.load_model` would build from a downloaded release (engine.md
section 4), without a checkpoint on disk: the same tensor names, dtypes and shapes, every
projection held by its `engine.linear.Linear` in its stored format through the Linear's own
loaders (`load_fp8`, `load_fp4`, `load_int2`, `load_dense`). It exists so that the real
V4-Flash shape (about 86 GiB with INT2 experts) can be run and measured where no weights can
be downloaded, and writing a random 160 GB checkpoint first would be pointless.

What is stored where (the table is `engine.make_checkpoint.release_layout(config)`):

- FP8 projections (attention, indexer `wq_b`, shared expert, MTP `e_proj`/`h_proj`):
  N(0, 1/fan_in) in fp32 on the device, quantised by `formats.quantize_fp8` (e4m3 + E8M0
  128x128 block scales).
- Routed experts, `experts="int2"` (default; what a user's `--model` of the INT2-G64 release
  gives): the main layers' experts are INT2-G64, made stacked per layer and projection
  `[E, out, in/16]` like the release's `layer_NN.safetensors` and handed to each expert's
  Linear as a slice, as `engine.weights` does. The packed words are drawn directly (uniform
  random bits: every 2-bit code 0..3 equally likely), the 4-bit zeros uniformly from {1, 2}
  (what GPTQ's min/max rounding gives a zero-centred group) and packed with
  `formats.pack_int4_zeros`, the fp16 scales `std / sqrt(1.5) * exp(0.1 N(0,1))` so the
  dequantised weights have mean 0 and std ~ 1/sqrt(fan_in) (E[(q - z)^2] = 1.25 + 0.25).
  Quantising 277 B normal values instead would cost minutes for the same format. The MTP
  block's experts stay FP4: the INT2 release covers the 43 main layers only, and the loader
  takes the rest from the official release.
- Routed experts, `experts="release"`: the release's own format (packed FP4 + E8M0 per 32
  inputs for V4-Flash): N(0, 1/fan_in) quantised by `formats.quantize_fp4`, stacked per
  layer and projection, in chunks that bound the fp32 temporaries.
- Everything else as `release_layout` says (BF16 embed/head/norms/compressors/router, F32
  hyper-connection/sink/ape/bias, I64 `tid2eid`), drawn with make_checkpoint's rules
  (norms 1, "small" 0.1 N(0,1), embed N(0,1), matrices N(0, 1/fan_in), distinct experts per
  token in `tid2eid`), then converted to the dtype the model declares when that widens
  exactly (BF16 -> F32), as the loader does.

Generation is per load group (`layers.L`, `mtp.K`, the top-level tensors) with a device
generator seeded from (seed, group index): deterministic per seed and device (CPU and CUDA
draw different numbers), and a layer's values do not depend on how many layers the
configuration has. Host memory stays at the model's Python objects; device memory peaks at
the model plus one projection's fp32 temporaries.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import torch
from torch import nn

from engine import formats as fm
from engine.formats import WeightFormat
from engine.linear import Linear
from engine.make_checkpoint import TensorSpec, release_layout
from engine.model import Transformer

EXPERT_MODES = ("int2", "release")
# `layers.L.ffn.experts.E.wK.weight` and `mtp.K.ffn.experts.E.wK.weight`
_ROUTED = re.compile(r"(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight")
# E[(q - z)^2] for q uniform in 0..3 and z uniform in {1, 2}: Var(q) + E[(1.5 - z)^2]
_INT2_CODE_MEAN_SQUARE = 1.25 + 0.25
_INT2_SCALE_JITTER = 0.1  # lognormal spread of the per-group scales
_CHUNK_ELEMENTS = 1 << 27  # fp32 elements quantised at once (512 MiB)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _group_key(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else "top"


def _group_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 17) % (1 << 63)


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, device: torch.device,
            mean: float = 0.0) -> torch.Tensor:
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    if std != 1.0:
        t.mul_(std)
    if mean:
        t.add_(mean)
    return t


def _plain_value(spec: TensorSpec, config, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """A non-projection tensor (or a BF16 matrix), by make_checkpoint's init rules."""
    if spec.init == "ones":
        return torch.ones(spec.shape, device=device)
    if spec.init == "small":
        return _normal(spec.shape, 0.1, g, device)
    if spec.init == "embed":
        return _normal(spec.shape, 1.0, g, device)
    if spec.init == "tid2eid":
        # each token's K experts are distinct; argsort one row block at a time
        V, E, K = config.vocab_size, config.n_routed_experts, config.num_experts_per_tok
        out = torch.empty(V, K, dtype=torch.int64, device=device)
        rows = max(1, _CHUNK_ELEMENTS // (4 * E))
        for lo in range(0, V, rows):
            n = min(rows, V - lo)
            ranks = torch.rand(n, E, generator=g, device=device)
            out[lo : lo + n] = ranks.argsort(dim=-1)[:, :K]
        return out
    return _normal(spec.shape, spec.shape[-1] ** -0.5, g, device)


def random_int2(num: int, out_features: int, in_features: int, std: float, g: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked INT2-G64 (w_packed uint32 [num, out, in/16], w_scale fp16 [num, out, in/64],
    w_zero_packed int8 [num, out, in/128]) whose dequantised values have mean 0, std ~ std."""
    (_, words), (_, groups), _ = fm.int2_shapes(out_features, in_features)
    # uniform random bytes viewed as words: each 2-bit code is uniform in 0..3
    packed = torch.randint(0, 256, (num, out_features, 4 * words), dtype=torch.uint8,
                           generator=g, device=device).view(torch.uint32)
    zeros = torch.randint(1, 3, (num, out_features, groups), dtype=torch.uint8, generator=g,
                          device=device)
    zero_packed = fm.pack_int4_zeros(zeros)
    del zeros
    scale = torch.randn(num, out_features, groups, generator=g, device=device)
    scale = (scale.mul_(_INT2_SCALE_JITTER).exp_()
             .mul_(std / math.sqrt(_INT2_CODE_MEAN_SQUARE)).to(torch.float16))
    return packed, scale, zero_packed


def random_fp4(num: int, out_features: int, in_features: int, std: float, g: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked packed FP4 (int8 [num, out, in/2], E8M0 [num, out, in/32]) of N(0, std^2)
    values, quantised by `formats.quantize_fp4` a few experts at a time."""
    packed = torch.empty(num, out_features, in_features // 2, dtype=torch.int8, device=device)
    scale = torch.empty(num, out_features, in_features // fm.FP4_GROUP, dtype=torch.uint8,
                        device=device)
    step = max(1, _CHUNK_ELEMENTS // (out_features * in_features))
    for lo in range(0, num, step):
        n = min(step, num - lo)
        w = _normal((n * out_features, in_features), std, g, device)
        q, s = fm.quantize_fp4(w)
        del w
        packed[lo : lo + n] = q.view(n, out_features, -1)
        scale[lo : lo + n] = s.view(torch.uint8).view(n, out_features, -1)
    return packed, scale.view(torch.float8_e8m0fnu)


def _set_plain(module: nn.Module, leaf: str, value: torch.Tensor, name: str) -> None:
    target = getattr(module, leaf)
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{name}: the model expects shape {list(target.shape)}, "
                         f"the release layout has {list(value.shape)}")
    if value.dtype != target.dtype:
        widens = (value.dtype in _FLOATS and target.dtype == torch.float32) or (
            not value.dtype.is_floating_point and not target.dtype.is_floating_point
            and target.itemsize >= value.itemsize)
        if not widens:
            raise TypeError(f"{name}: release dtype {value.dtype} does not widen to the "
                            f"model's {target.dtype}")
        value = value.to(target.dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _load_projection(linear: Linear, fmt: WeightFormat, value: torch.Tensor, name: str) -> None:
    if fmt == WeightFormat.FP8:
        linear.load_fp8(*fm.quantize_fp8(value), name=name)
    elif fmt == WeightFormat.FP4:
        linear.load_fp4(*fm.quantize_fp4(value), name=name)
    else:
        linear.load_dense(value.to(torch.bfloat16), name=name)


def _routed_group(modules: dict[str, nn.Module], prefix: str, specs: list[TensorSpec],
                  fmt: WeightFormat, g: torch.Generator, device: torch.device) -> None:
    """One layer's routed experts, stacked per projection, sliced into the experts' Linears."""
    by_proj: dict[str, list[tuple[int, TensorSpec]]] = {}
    for spec in specs:
        m = _ROUTED.fullmatch(spec.name)
        by_proj.setdefault(m.group(4), []).append((int(m.group(3)), spec))
    for proj, entries in sorted(by_proj.items()):
        entries.sort(key=lambda e: e[0])
        out_features, in_features = entries[0][1].shape
        std = in_features ** -0.5
        n = len(entries)
        if fmt == WeightFormat.INT2:
            packed, scale, zero = random_int2(n, out_features, in_features, std, g, device)
            for k, (e, _) in enumerate(entries):
                linear = modules[f"{prefix}.ffn.experts.{e}.{proj}"]
                linear.load_int2(packed[k], scale[k], zero[k],
                                 name=f"{prefix} INT2 {proj}[{e}]")
        elif fmt == WeightFormat.FP4:
            packed, scale = random_fp4(n, out_features, in_features, std, g, device)
            for k, (_, spec) in enumerate(entries):
                modules[spec.name.removesuffix(".weight")].load_fp4(packed[k], scale[k],
                                                                    name=spec.name)
        else:  # FP8 / dense experts (configs other than V4-Flash): one at a time
            for _, spec in entries:
                value = _normal(spec.shape, std, g, device)
                _load_projection(modules[spec.name.removesuffix(".weight")], fmt, value, spec.name)


@torch.no_grad()
def materialize_random_(model: Transformer, seed: int = 0, device: str | torch.device | None = None,
                        experts: str = "int2",
                        progress: Callable[[str, float], None] | None = None) -> Transformer:
    """Give every parameter and buffer of `model` (built on meta, or anywhere) random values
    in its stored release format on `device` (cuda when present). `progress(group, seconds)`
    is called after each load group. Returns the model, in eval mode."""
    if experts not in EXPERT_MODES:
        raise ValueError(f"experts must be one of {EXPERT_MODES}, got {experts!r}")
    c = model.config
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = dict(model.named_modules())
    groups: dict[str, list[TensorSpec]] = {}
    for spec in release_layout(c):
        groups.setdefault(_group_key(spec.name), []).append(spec)
    for index, (key, specs) in enumerate(groups.items()):
        t0 = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(_group_seed(seed, index))
        routed: list[TensorSpec] = []
        routed_fmt: WeightFormat | None = None
        for spec in specs:
            if _ROUTED.fullmatch(spec.name):
                routed.append(spec)
                int2 = experts == "int2" and spec.name.startswith("layers.")
                routed_fmt = WeightFormat.INT2 if int2 else spec.fmt
                continue
            if spec.fmt is not None:
                value = _normal(spec.shape, spec.shape[-1] ** -0.5, g, device)
                _load_projection(modules[spec.name.removesuffix(".weight")], spec.fmt, value,
                                 spec.name)
                continue
            path, _, leaf = spec.name.rpartition(".")
            module = modules[path]
            value = _plain_value(spec, c, g, device).to(spec.dtype)
            if isinstance(module, Linear) and leaf == "weight":  # BF16 matrices (head, router)
                module.load_dense(value, name=spec.name)
            else:
                _set_plain(module, leaf, value, spec.name)
        if routed:
            _routed_group(modules, key, routed, routed_fmt, g, device)
        if progress is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            progress(key, time.perf_counter() - t0)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"the release layout does not cover these model tensors: {left[:10]}")
    return model.eval()


def random_model(config, device: str | torch.device | None = None, seed: int = 0,
                 experts: str = "int2", dtype: torch.dtype = torch.bfloat16,
                 progress: Callable[[str, float], None] | None = None) -> Transformer:
    """`Transformer(config, dtype)` built on meta and materialised by `materialize_random_`."""
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    return materialize_random_(model, seed=seed, device=device, experts=experts,
                               progress=progress)


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names a checkpoint would hold them: `X.weight` /
    `X.scale` for FP8/FP4/dense projections, `X w_packed` / `X w_scale` / `X w_zero_packed`
    for INT2 ones, and every other parameter and buffer under its module path."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        linear = isinstance(module, Linear)
        if linear:
            if module.format == WeightFormat.INT2:
                for field, t in zip(fm.INT2_FIELDS, (module.weight, module.scale, module.zero),
                                    strict=True):
                    out[f"{path} {field}"] = t
            else:
                out[f"{prefix}weight"] = module.weight
                if module.scale is not None:
                    out[f"{prefix}scale"] = module.scale
        for leaf, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if linear and leaf in ("weight", "scale", "zero"):
                continue
            out[prefix + leaf] = t
    return out
