"""Loading a checkpoint directory in DeepSeek-V4-Flash's official layout into the model.

The directory is what the release ships (engine.md section 4): `config.json`, safetensors
shards with `model.safetensors.index.json` (a lone `model.safetensors` also works), tensor
names equal to the model's module paths. Optionally, INT2-G64 expert files
`layer_NN.safetensors` sit beside them, one for every main layer (all or none; numbered from
00; a stray file, such as one numbered from 1 or past the last layer, is refused). Each main
layer then takes its routed experts from its file, and the shards' FP4 experts are not
loaded; where they are present (the INT2 release takes everything else from the FP4 one, so
they usually are), a few INT2 experts are first compared with them: a relative error of a
2-bit quantisation (under `formats.INT2_FIT_MAX`) confirms the bit layout and the numbering,
anything else is refused with the convention (`formats.INT2_CONVENTIONS`) that does fit.

Weights keep their stored format: each `engine.linear.Linear` receives the tensors as
stored (FP8 + scale, packed FP4 + scale, INT2-G64, or dense), chosen by the stored dtype;
every other parameter is converted to the dtype the model declares when that widens
exactly (BF16 -> F32) and refused otherwise. The model is built on the meta device and
materialised one layer at a time from memory-mapped shards (safetensors `safe_open`), so
peak host memory is one layer, not the model; a progress bar shows for big checkpoints.

Everything is checked before anything is read: a missing tensor, an unexpected one, a wrong
shape or a wrong dtype raises `CheckpointError` naming the tensor, what was expected and
what was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from engine import formats as fm
from engine.config import ModelConfig
from engine.linear import Linear, tensor_names
from engine.model import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PROGRESS_MIN_BYTES = 2 << 30  # below this a load takes seconds; no bar
# Routed expert projections, which INT2 files replace: `layers.{L}.ffn.experts.{E}.{w1,w2,w3}`.
_ROUTED = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])")

# safetensors dtype strings -> torch dtypes (the ones a V4 checkpoint can hold).
_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "U32": torch.uint32,
    "I64": torch.int64,
}
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INTS = (torch.int8, torch.uint8, torch.int32, torch.int64)


class CheckpointError(ValueError):
    """The checkpoint does not match the model: names the tensor, expected and found."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Shards:
    """Index of a checkpoint directory: tensor name -> (file, shape, dtype), opened lazily."""

    def __init__(self, path: Path, stack: ExitStack, device: torch.device) -> None:
        self.path, self._stack, self._device = path, stack, device
        self._handles: dict[str, Any] = {}
        if (path / INDEX_FILE).is_file():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        elif (path / SINGLE_FILE).is_file():
            weight_map = dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}")
        self.files: dict[str, str] = weight_map

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            if not (self.path / file).is_file():
                raise CheckpointError(f"{self.path / file}: shard listed in the index is missing")
            self._handles[file] = self._stack.enter_context(
                safe_open(self.path / file, framework="pt", device=str(self._device)))
        return self._handles[file]

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = self._open(self.files[name]).get_slice(name)
        dtype = _ST_DTYPES.get(s.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{name}: unsupported stored dtype {s.get_dtype()}")
        return tuple(s.get_shape()), dtype

    def get(self, name: str) -> torch.Tensor:
        return self._open(self.files[name]).get_tensor(name)


def _stored_linear_format(name: str, dtype: torch.dtype) -> fm.WeightFormat:
    if dtype in fm.DENSE_DTYPES:
        return fm.WeightFormat.DENSE
    if dtype == torch.float8_e4m3fn:
        return fm.WeightFormat.FP8
    if dtype in (torch.int8, torch.uint8):
        return fm.WeightFormat.FP4
    raise CheckpointError(
        f"{name}: expected a Linear weight dtype (bfloat16/float16/float32 dense, "
        f"float8_e4m3fn FP8, int8 packed FP4), found {_dtype_name(dtype)}")


def _check_plain(name: str, target: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if shape != tuple(target.shape):
        raise CheckpointError(f"{name}: expected shape {list(target.shape)}, found {list(shape)}")
    want = target.dtype
    widens = (dtype == want or (dtype in _FLOATS and want == torch.float32)
              or (dtype in _INTS and want in _INTS and want.itemsize > dtype.itemsize))
    if not widens:
        raise CheckpointError(f"{name}: expected dtype {_dtype_name(want)}, found {_dtype_name(dtype)}")


def _groups(model: nn.Module) -> dict[str, list[str]]:
    """Module paths grouped by load unit: `layers.L`, `mtp.K`, or a top-level name."""
    groups: dict[str, list[str]] = {}
    for path, _ in model.named_modules():
        parts = path.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("layers", "mtp") and len(parts) > 1 else parts[0]
        groups.setdefault(key, []).append(path)
    return groups


_INT2_FILE = re.compile(r"layer_(\d+)\.safetensors")


def _int2_layers(path: Path, model: nn.Module) -> dict[int, Path]:
    """The INT2-G64 expert file of every main layer, or {} when there are none.

    All or none: a file for only some layers would run the others on FP4 experts unnoticed,
    and a file that is no main layer's (numbered from 1, past the last layer, spelled
    otherwise) means the files are not what this engine reads."""
    layers = sorted({int(m.group(1)) for name, _ in model.named_modules()
                     if (m := _ROUTED.fullmatch(name))})
    found: dict[int, Path] = {}
    stray: list[str] = []
    for file in sorted(path.glob("layer_*.safetensors")):
        m = _INT2_FILE.fullmatch(file.name)
        if m is None or file.name != fm.int2_file_name(int(m.group(1))):
            stray.append(file.name)
        else:
            found[int(m.group(1))] = file
    if not found and not stray:
        return {}
    if not layers:
        raise CheckpointError(f"{path}: INT2 expert files ({sorted(f.name for f in found.values())[:3]}"
                              f"...) beside a model without routed experts")
    want = set(layers)
    if set(found) == {L + 1 for L in layers} and not stray:
        raise CheckpointError(
            f"{path}: INT2 expert files are numbered from 1 ({fm.int2_file_name(layers[0] + 1)}"
            f" ... {fm.int2_file_name(layers[-1] + 1)}), this engine from 0 "
            f"({fm.int2_file_name(layers[0])} is main layer {layers[0]}'s experts): with "
            f"1-based files each layer would take the next one's experts; rename them "
            f"(layer_NN -> layer_NN-1) if they are 1-based")
    stray += [f.name for L, f in sorted(found.items()) if L not in want]
    if stray:
        raise CheckpointError(
            f"{path}: INT2 expert files that are no main layer's: {stray[:10]} (this model has "
            f"{len(layers)} main layers with routed experts, {fm.int2_file_name(layers[0])} "
            f"... {fm.int2_file_name(layers[-1])})")
    if missing := [L for L in layers if L not in found]:
        raise CheckpointError(
            f"{path}: INT2 expert files for {len(found)} of {len(layers)} main layers; missing "
            f"{[fm.int2_file_name(L) for L in missing[:10]]} (all or none: the other layers "
            f"would silently run their FP4 experts)")
    return found


_LINEAR_TENSORS = frozenset({"weight", "scale", "zero"})  # loaded through Linear.load_*


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(leaf, tensor, is_parameter) of a module's own persistent parameters and buffers,
    besides a Linear's stored weight (a Linear subclass such as the router adds its own)."""
    skip = _LINEAR_TENSORS if isinstance(module, Linear) else frozenset()
    for leaf, p in module.named_parameters(recurse=False):
        if leaf not in skip:
            yield leaf, p, True
    for leaf, b in module.named_buffers(recurse=False):
        if leaf not in module._non_persistent_buffers_set and leaf not in skip:
            yield leaf, b, False


def load_checkpoint(model: nn.Module, path: str | Path, device: str | torch.device | None = None,
                    progress: bool | None = None) -> None:
    """Fill `model` (built on the meta device, or anywhere) from checkpoint directory `path`.

    `device` defaults to cuda when present; `progress` defaults to a bar for checkpoints over
    2 GiB. Raises CheckpointError before reading any weight if names, shapes or dtypes
    disagree with the model.
    """
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = dict(model.named_modules())
    with ExitStack() as stack:
        shards = _Shards(path, stack, device)
        int2_files = _int2_layers(path, model)
        plan = _plan(modules, shards, int2_files)
        if int2_files:
            _check_int2_fit(modules, shards, int2_files, device)
        groups = _groups(model)
        size = sum((path / f).stat().st_size for f in set(shards.files.values()))
        show = size > PROGRESS_MIN_BYTES if progress is None else progress
        int2_handles: dict[int, Any] = {}
        for key in tqdm(groups, desc="loading weights", unit="layer", disable=not show):
            for module_path in groups[key]:
                _load_module(modules[module_path], module_path, plan, shards, int2_files,
                             int2_handles, stack, device)
            int2_handles.clear()  # one layer's INT2 tensors at a time
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"still on the meta device after loading (the model computes "
                              f"them, not the checkpoint; build them after load): {left[:10]}")


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.bfloat16, progress: bool | None = None,
               **config_overrides: Any) -> Transformer:
    """Config from `path/config.json`, the model built on meta, then filled from `path`.

    `dtype` is the activation dtype (bf16 for real checkpoints); `config_overrides` go to
    `ModelConfig.from_json` (e.g. `qat=False`). A `path` that is a file starting with the
    GGUF magic is antirez's ds4 GGUF instead, loaded by `engine.gguf` (its own config).
    """
    from engine.gguf import is_gguf_file, load_gguf_model  # engine.gguf imports this module

    if is_gguf_file(path):
        return load_gguf_model(path, device=device, dtype=dtype, progress=progress,
                               **config_overrides)
    config = ModelConfig.from_json(Path(path), **config_overrides)
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    load_checkpoint(model, path, device=device, progress=progress)
    return model.eval()


def _plan(modules: dict[str, nn.Module], shards: _Shards, int2_files: dict[int, Path]) -> dict[str, Any]:
    """Check every name, shape and dtype against the model; return what to load per module."""
    expected: set[str] = set()
    ignored: set[str] = set()
    plan: dict[str, Any] = {}
    problems: list[str] = []
    num_experts: dict[int, int] = {}
    for mpath in modules:
        if m := _ROUTED.fullmatch(mpath):
            layer = int(m.group(1))
            num_experts[layer] = max(num_experts.get(layer, 0), int(m.group(2)) + 1)

    def need(name: str) -> bool:
        expected.add(name)
        if name not in shards.files:
            problems.append(f"{name}: missing from the checkpoint")
            return False
        return True

    for mpath, module in modules.items():
        prefix = f"{mpath}." if mpath else ""
        if isinstance(module, Linear):
            m = _ROUTED.fullmatch(mpath)
            wname = f"{prefix}weight"
            if m and int(m.group(1)) in int2_files:
                # The INT2 file replaces these; the shards may still hold the FP4 originals.
                ignored.update({wname, f"{prefix}scale"})
                layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
                plan[mpath] = ("int2", layer, expert, proj)
                if expert == 0:
                    problems += _check_int2(int2_files[layer], proj, module, num_experts[layer])
            elif need(wname):
                fmt = _stored_linear_format(wname, shards.meta(wname)[1])
                names = tensor_names(wname, fmt)
                if all(need(n) for n in names.values()):
                    try:
                        module.check_stored(fmt, names, {f: shards.meta(n) for f, n in names.items()})
                    except (TypeError, ValueError) as e:
                        problems.append(str(e))
                plan[mpath] = (fmt,)
        for leaf, t, _ in _own_tensors(module):
            name = prefix + leaf
            if need(name):
                shape, dtype = shards.meta(name)
                try:
                    _check_plain(name, t, shape, dtype)
                except CheckpointError as e:
                    problems.append(str(e))
    unexpected = sorted(set(shards.files) - expected - ignored)
    problems += [f"{n}: unexpected tensor (the model has no such parameter)" for n in unexpected]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{shards.path} does not match the model:\n  {shown}{more}")
    return plan


def _load_module(module: nn.Module, mpath: str, plan: dict[str, Any], shards: _Shards,
                 int2_files: dict[int, Path], int2_handles: dict[int, Any], stack: ExitStack,
                 device: torch.device) -> None:
    prefix = f"{mpath}." if mpath else ""
    if isinstance(module, Linear):
        entry = plan[mpath]
        wname = f"{prefix}weight"
        try:
            if entry[0] == "int2":
                _, layer, expert, proj = entry
                if layer not in int2_handles:
                    int2_handles[layer] = _read_int2_layer(int2_files[layer], stack, device)
                fields = [int2_handles[layer][fm.int2_key(proj, f)][expert] for f in fm.INT2_FIELDS]
                module.load_int2(*fields, name=f"{int2_files[layer].name} {proj}[{expert}]")
            elif entry[0] == fm.WeightFormat.DENSE:
                module.load_dense(shards.get(wname), name=wname)
            elif entry[0] == fm.WeightFormat.FP8:
                module.load_fp8(shards.get(wname), shards.get(f"{prefix}scale"), name=wname)
            else:
                module.load_fp4(shards.get(wname), shards.get(f"{prefix}scale"), name=wname)
        except (TypeError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    for leaf, t, is_param in _own_tensors(module):
        value = shards.get(prefix + leaf).to(t.dtype)
        if is_param:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value


def _read_int2_layer(file: Path, stack: ExitStack, device: torch.device) -> dict[str, torch.Tensor]:
    f = stack.enter_context(safe_open(file, framework="pt", device=str(device)))
    return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _check_int2(file: Path, proj: str, linear: Linear, num_experts: int) -> list[str]:
    """Problems of one projection's three tensors in an INT2-G64 layer file (none if it fits)."""
    with safe_open(file, framework="pt") as f:
        keys = set(f.keys())
        found = {}
        for field in fm.INT2_FIELDS:
            key = fm.int2_key(proj, field)
            if key not in keys:
                return [f"{file.name}: {key} missing (found {sorted(keys)})"]
            s = f.get_slice(key)
            found[field] = (tuple(s.get_shape()), _ST_DTYPES.get(s.get_dtype(), s.get_dtype()))
    problems = []
    if unexpected := keys - {fm.int2_key(p, k) for p in ("w1", "w2", "w3") for k in fm.INT2_FIELDS}:
        problems.append(f"{file.name}: unexpected tensors {sorted(unexpected)}")
    names = {"weight": f"{file.name} {fm.int2_key(proj, 'w_packed')}",
             "scale": f"{file.name} {fm.int2_key(proj, 'w_scale')}",
             "zero": f"{file.name} {fm.int2_key(proj, 'w_zero_packed')}"}
    for (shape, _), name in zip(found.values(), names.values(), strict=True):
        if not shape or shape[0] != num_experts:
            problems.append(f"{name}: expected {num_experts} experts first, found shape {list(shape)}")
    if problems:
        return problems
    try:  # one expert's slice, against the Linear's INT2 spec
        linear.check_stored(fm.WeightFormat.INT2, names,
                            {k: (shape[1:], dtype) for k, (shape, dtype) in
                             zip(("weight", "scale", "zero"), found.values(), strict=True)})
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    return problems


# What the INT2 check compares: the first and last INT2 layers, their first and last
# experts, the first rows of w1, w2, w3 (rows are independent in both formats).
_FIT_ROWS = 256


def _reference_rows(shards: _Shards, prefix: str, rows: int) -> torch.Tensor | None:
    """The shards' own copy of one routed projection (the release's FP4, or FP8 / dense),
    its first `rows` rows dequantised to float32; None when the shards lack it."""
    wname = f"{prefix}.weight"
    if wname not in shards.files:
        return None
    fmt = _stored_linear_format(wname, shards.meta(wname)[1])
    if fmt != fm.WeightFormat.DENSE and f"{prefix}.scale" not in shards.files:
        return None
    w = shards.get(wname)[:rows]
    if fmt == fm.WeightFormat.FP4:
        return fm.dequantize_fp4(w, shards.get(f"{prefix}.scale")[:rows], torch.float32)
    if fmt == fm.WeightFormat.FP8:
        scale = shards.get(f"{prefix}.scale")[: -(-rows // fm.FP8_BLOCK)]
        return fm.dequantize_fp8(w, scale, torch.float32)
    return w.float()


def _int2_errors(file: Path, layer: int, experts: list[int], shards: _Shards,
                 device: torch.device) -> dict[fm.Int2Convention, float] | None:
    """Relative error of `file`'s experts against main layer `layer`'s in the shards, under
    each known convention; None when the shards hold no copy to compare with."""
    diff = dict.fromkeys(fm.INT2_CONVENTIONS, 0.0)
    total = 0.0
    with safe_open(file, framework="pt", device=str(device)) as f:
        for e in experts:
            for proj in ("w1", "w2", "w3"):
                ref = _reference_rows(shards, f"layers.{layer}.ffn.experts.{e}.{proj}", _FIT_ROWS)
                if ref is None:
                    return None
                fields = [f.get_slice(fm.int2_key(proj, k))[e:e + 1, :_FIT_ROWS][0]
                          for k in fm.INT2_FIELDS]
                total += float(ref.norm()) ** 2
                for convention in diff:
                    approx = fm.dequantize_int2_as(convention, *fields)
                    diff[convention] += float((approx - ref).norm()) ** 2
    if total == 0:
        return None
    return {c: (d / total) ** 0.5 for c, d in diff.items()}


def _check_int2_fit(modules: dict[str, nn.Module], shards: _Shards, int2_files: dict[int, Path],
                    device: torch.device) -> None:
    """Refuse INT2 files that do not dequantise close to the shards' own experts, naming the
    convention (or the layer numbering) that fits instead (module docstring)."""
    num_experts: dict[int, int] = {}
    for mpath in modules:
        if m := _ROUTED.fullmatch(mpath):
            layer = int(m.group(1))
            num_experts[layer] = max(num_experts.get(layer, 0), int(m.group(2)) + 1)
    layers = sorted(int2_files)
    for layer in sorted({layers[0], layers[-1]}):
        experts = sorted({0, num_experts[layer] - 1})
        file = int2_files[layer]
        errors = _int2_errors(file, layer, experts, shards, device)
        if errors is None:
            continue  # no FP4 (or other) copy of these experts to compare with
        default = errors[fm.INT2_DEFAULT]
        if default <= fm.INT2_FIT_MAX:
            continue
        found = (f"{file.name} does not match main layer {layer}'s experts in the shards: "
                 f"relative error {default:.2f} under this engine's INT2 convention "
                 f"({fm.INT2_DEFAULT.describe()}), where a 2-bit quantisation gives about 0.5")
        best = min(errors, key=errors.__getitem__)
        if errors[best] <= fm.INT2_FIT_MAX:
            raise CheckpointError(
                f"{found}. It fits {best.describe()} (relative error {errors[best]:.2f}): the "
                f"files use that convention; change unpack_int2 / unpack_int4_zeros in "
                f"engine/formats.py to read them")
        for other in (layer - 1, layer + 1):  # numbering off by one?
            if other in num_experts:
                shifted = _int2_errors(file, other, sorted({0, num_experts[other] - 1}), shards,
                                       device)
                if shifted is not None and min(shifted.values()) <= fm.INT2_FIT_MAX:
                    raise CheckpointError(
                        f"{found}. It holds main layer {other}'s experts (relative error "
                        f"{min(shifted.values()):.2f}): the files are numbered "
                        f"{'from 1' if other < layer else 'from -1'}, this engine from 0")
        raise CheckpointError(
            f"{found}, and no known convention fits (best: {best.describe()}, relative error "
            f"{errors[best]:.2f}): the files are not the INT2 quantisation of these experts "
            f"(another model's, other key names, or another layout)")
