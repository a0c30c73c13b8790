"""engine/weights.py on a toy model with release-style names: formats, INT2 overlay, errors.

The full tiny checkpoint is loaded into the real model in test_make_checkpoint.py; here the
model is small and hand-built, so each error case writes its own two-file checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine import formats as fm
from engine.formats import WeightFormat
from engine.linear import Linear
from engine.weights import INDEX_FILE, CheckpointError, load_checkpoint

H, INTER, E = 128, 128, 2  # hidden, expert intermediate, experts


class Gate(Linear):
    def __init__(self) -> None:
        super().__init__(H, E)
        self.register_buffer("tid2eid", torch.empty(50, 1, dtype=torch.int64))


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(H, INTER), Linear(INTER, H), Linear(H, INTER)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = nn.Module()
        self.attn_norm.weight = nn.Parameter(torch.empty(H), requires_grad=False)  # fp32 in the model
        self.attn = nn.Module()
        self.attn.wq_a = Linear(H, 256)
        self.attn.wkv = Linear(H, 64)
        self.ffn = nn.Module()
        self.ffn.gate = Gate()
        self.ffn.experts = nn.ModuleList(Expert() for _ in range(E))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer()])
        self.hc_head_fn = nn.Parameter(torch.empty(4, H), requires_grad=False)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * shape[-1] ** -0.5


def _release() -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {
        "hc_head_fn": _rand(4, H),
        "layers.0.attn_norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "layers.0.attn.wkv.weight": _rand(64, H, seed=1).bfloat16(),
        "layers.0.ffn.gate.weight": _rand(E, H, seed=2).bfloat16(),
        "layers.0.ffn.gate.tid2eid": torch.randint(0, E, (50, 1)),
    }
    t["layers.0.attn.wq_a.weight"], t["layers.0.attn.wq_a.scale"] = fm.quantize_fp8(_rand(256, H, seed=3))
    for e in range(E):
        for k, proj in enumerate(("w1", "w2", "w3")):
            w = _rand(*((H, INTER) if proj == "w2" else (INTER, H)), seed=10 * e + k)
            p = f"layers.0.ffn.experts.{e}.{proj}"
            t[f"{p}.weight"], t[f"{p}.scale"] = fm.quantize_fp4(w)
    return t


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Two shards + index, like the release."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2]), start=1):
        file = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _meta_toy() -> Toy:
    with torch.device("meta"):
        return Toy()


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_loads_every_format_and_keeps_it(tmp_path, device):
    tensors = {k: v.to(device) for k, v in _release().items()}
    model = _meta_toy()
    load_checkpoint(model, _write(tmp_path, {k: v.cpu() for k, v in tensors.items()}), device=device)
    layer = model.layers[0]
    assert layer.attn.wq_a.weight.device.type == device
    assert layer.attn.wq_a.format == WeightFormat.FP8
    assert layer.attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.attn.wq_a.dense_weight(torch.float32),
                       fm.dequantize_fp8(tensors["layers.0.attn.wq_a.weight"],
                                         tensors["layers.0.attn.wq_a.scale"], torch.float32))
    expert = layer.ffn.experts[1].w2
    assert expert.format == WeightFormat.FP4 and expert.weight.dtype == torch.int8
    assert torch.equal(expert.dense_weight(torch.float32),
                       fm.dequantize_fp4(tensors["layers.0.ffn.experts.1.w2.weight"],
                                         tensors["layers.0.ffn.experts.1.w2.scale"], torch.float32))
    assert layer.attn.wkv.format == WeightFormat.DENSE
    assert torch.equal(layer.attn.wkv.weight, tensors["layers.0.attn.wkv.weight"])
    # The router is a Linear subclass: its weight and its own tid2eid buffer both load.
    assert torch.equal(layer.ffn.gate.tid2eid, tensors["layers.0.ffn.gate.tid2eid"])
    assert torch.equal(layer.ffn.gate.weight, tensors["layers.0.ffn.gate.weight"])
    # BF16 on disk, fp32 in the model: widened exactly.
    assert layer.attn_norm.weight.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    y = layer.ffn.experts[0].w1(torch.randn(3, H, dtype=torch.bfloat16, device=device))
    assert y.shape == (3, INTER) and torch.isfinite(y).all()


def test_int2_files_replace_the_routed_experts(tmp_path):
    tensors = _release()
    path = _write(tmp_path, tensors)
    dense = {p: _rand(E, *((H, INTER) if p == "w2" else (INTER, H)), seed=99) for p in ("w1", "w2", "w3")}
    int2 = {}
    for proj, w in dense.items():
        for field, t in zip(fm.INT2_FIELDS, fm.quantize_int2(w), strict=True):
            int2[fm.int2_key(proj, field)] = t
    save_file(int2, path / fm.int2_file_name(0))
    model = _meta_toy()
    load_checkpoint(model, path, device="cpu")
    for e in range(E):
        for proj in ("w1", "w2", "w3"):
            lin = getattr(model.layers[0].ffn.experts[e], proj)
            assert lin.format == WeightFormat.INT2
            fields = [int2[fm.int2_key(proj, f)][e] for f in fm.INT2_FIELDS]
            assert torch.equal(lin.dense_weight(torch.float32),
                               fm.dequantize_int2(*fields, torch.float32))
    # The shards' FP4 experts of that layer are not required either.
    for name in [n for n in tensors if ".experts." in n]:
        del tensors[name]
    other = tmp_path / "no_fp4"
    _write(other, tensors)
    save_file(int2, other / fm.int2_file_name(0))
    load_checkpoint(_meta_toy(), other, device="cpu")


def test_single_file_checkpoint(tmp_path):
    tensors = {k: v.contiguous() for k, v in _release().items()}
    save_file(tensors, tmp_path / "model.safetensors")
    model = _meta_toy()
    load_checkpoint(model, tmp_path, device="cpu")
    assert model.layers[0].attn.wq_a.format == WeightFormat.FP8


def _broken(tmp_path: Path, change) -> Path:
    tensors = _release()
    change(tensors)
    return _write(tmp_path, tensors)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("layers.0.attn_norm.weight"),
     r"layers\.0\.attn_norm\.weight: missing from the checkpoint"),
    (lambda t: t.pop("layers.0.attn.wq_a.scale"),
     r"layers\.0\.attn\.wq_a\.scale: missing from the checkpoint"),
    (lambda t: t.update({"layers.0.attn.extra.weight": torch.zeros(2)}),
     r"layers\.0\.attn\.extra\.weight: unexpected tensor"),
    (lambda t: t.update({"layers.0.attn_norm.weight": torch.ones(H + 1)}),
     r"layers\.0\.attn_norm\.weight: expected shape \[128\], found \[129\]"),
    (lambda t: t.update({"layers.0.attn_norm.weight": torch.ones(H, dtype=torch.int64)}),
     r"layers\.0\.attn_norm\.weight: expected dtype float32, found int64"),
    (lambda t: t.update({"hc_head_fn": torch.ones(4, H, dtype=torch.int32)}),
     r"hc_head_fn: expected dtype float32, found int32"),
    (lambda t: t.update({"layers.0.attn.wkv.weight": torch.ones(64, H, dtype=torch.int32)}),
     r"layers\.0\.attn\.wkv\.weight: expected a Linear weight dtype .* found int32"),
])
def test_mismatches_are_reported_before_loading(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_meta_toy(), _broken(tmp_path, change), device="cpu")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"layers.0.attn.wq_a.weight": torch.zeros(256, 64).to(torch.float8_e4m3fn)}),
     r"layers\.0\.attn\.wq_a\.weight: expected shape \[256, 128\], found \[256, 64\]"),
    (lambda t: t.update({"layers.0.attn.wq_a.scale": torch.ones(2, 1)}),
     r"layers\.0\.attn\.wq_a\.scale: expected dtype float8_e8m0fnu or uint8, found float32"),
    (lambda t: t.update({"layers.0.ffn.experts.0.w1.scale": torch.ones(INTER, 2, dtype=torch.uint8)}),
     r"layers\.0\.ffn\.experts\.0\.w1\.scale: expected shape \[128, 4\], found \[128, 2\]"),
])
def test_linear_shape_and_dtype_errors_name_the_tensor(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_meta_toy(), _broken(tmp_path, change), device="cpu")


def test_missing_directory_contents(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json"):
        load_checkpoint(_meta_toy(), tmp_path, device="cpu")


def _int2_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for proj in ("w1", "w2", "w3"):
        w = _rand(E, *((H, INTER) if proj == "w2" else (INTER, H)), seed=7)
        for field, t in zip(fm.INT2_FIELDS, fm.quantize_int2(w), strict=True):
            out[fm.int2_key(proj, field)] = t
    return out


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("w2.w_scale"), r"layer_00\.safetensors: w2\.w_scale missing"),
    (lambda t: t.update({"w1.w_scale": t["w1.w_scale"].float()}),
     r"layer_00\.safetensors w1\.w_scale: expected dtype float16, found float32"),
    (lambda t: t.update({"w3.w_packed": t["w3.w_packed"][:1]}),
     r"layer_00\.safetensors w3\.w_packed: expected 2 experts first, found shape \[1, 128, 8\]"),
    (lambda t: t.update({"w1.w_zero_packed": torch.zeros(E, INTER, 2, dtype=torch.int8)}),
     r"layer_00\.safetensors w1\.w_zero_packed: expected shape \[128, 1\], found \[128, 2\]"),
    (lambda t: t.update({"w4.w_packed": t["w1.w_packed"].clone()}),
     r"unexpected tensors \['w4\.w_packed'\]"),
])
def test_int2_file_mismatches(tmp_path, change, message):
    path = _write(tmp_path, _release())
    tensors = _int2_tensors()
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / fm.int2_file_name(0))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_meta_toy(), path, device="cpu")


def test_linear_formats_directly():
    lin = Linear(256, 128)
    assert lin.format == WeightFormat.DENSE and list(lin.state_dict()) == ["weight"]
    w = _rand(128, 256)
    x = torch.randn(3, 256)
    for fmt, load, expected in [
        (WeightFormat.FP8, lambda: lin.load_fp8(*fm.quantize_fp8(w)),
         fm.dequantize_fp8(*fm.quantize_fp8(w), torch.float32)),
        (WeightFormat.FP4, lambda: lin.load_fp4(*fm.quantize_fp4(w)),
         fm.dequantize_fp4(*fm.quantize_fp4(w), torch.float32)),
        (WeightFormat.INT2, lambda: lin.load_int2(*fm.quantize_int2(w)),
         fm.dequantize_int2(*fm.quantize_int2(w), torch.float32)),
        (WeightFormat.DENSE, lambda: lin.load_dense(w.bfloat16()), w.bfloat16().float()),
    ]:
        load()
        assert lin.format == fmt
        assert torch.equal(lin(x), torch.nn.functional.linear(x, expected))
    lin.load_fp8(*fm.quantize_fp8(w), name="a.wq_a.weight")
    assert sorted(lin.state_dict()) == ["scale", "weight"]
    with pytest.raises(TypeError, match=r"a\.wq_a\.scale: expected dtype float8_e8m0fnu or uint8, found float32"):
        lin.load_fp8(fm.quantize_fp8(w)[0], torch.ones(1, 2), name="a.wq_a.weight")
    with pytest.raises(ValueError, match=r"x w_packed: expected shape \[128, 16\], found \[128, 8\]"):
        lin.load_int2(torch.zeros(128, 8, dtype=torch.uint32), torch.zeros(128, 4, dtype=torch.float16),
                      torch.zeros(128, 2, dtype=torch.int8), name="x")
