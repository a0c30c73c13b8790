"""engine/make_checkpoint.py: the tiny random checkpoint is in the release layout and loads
into engine.model back to exactly the values that were quantised (FP8, FP4, INT2-G64)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from engine import formats as fm
from engine.config import ModelConfig
from engine.formats import WeightFormat
from engine.make_checkpoint import (
    INDEX_FILE,
    main,
    random_int2_experts,
    random_tensors,
    release_layout,
    write_checkpoint,
)
from engine.model import Transformer
from engine.weights import load_model

SEED = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    main(["--config", "tiny", "--out", str(out), "--seed", str(SEED), "--int2"])
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, device="cpu")


def test_directory_is_self_contained_release_layout(checkpoint):
    config = ModelConfig.from_json(checkpoint)
    assert config == ModelConfig.tiny()
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (checkpoint / "tokenizer.json").stat().st_size > 1_000_000
    assert sorted(p.name for p in checkpoint.glob("layer_*.safetensors")) == [
        fm.int2_file_name(layer) for layer in range(config.num_hidden_layers)]
    # Stored dtypes as the release stores them (engine.md section 4).
    expected = {
        "embed.weight": "BF16", "hc_head_fn": "F32", "layers.0.attn.wq_a.weight": "F8_E4M3",
        "layers.0.attn.wq_a.scale": "F8_E8M0", "layers.0.ffn.experts.0.w2.weight": "I8",
        "layers.0.ffn.experts.0.w2.scale": "F8_E8M0", "layers.0.ffn.gate.tid2eid": "I64",
        "layers.2.ffn.gate.bias": "F32", "layers.2.attn.compressor.wkv.weight": "BF16",
        "layers.2.attn.indexer.wq_b.weight": "F8_E4M3", "layers.3.attn.compressor.ape": "F32",
        "layers.0.attn.attn_sink": "F32", "layers.0.hc_attn_fn": "F32",
    }
    total = 0
    for name, dtype in expected.items():
        with safe_open(checkpoint / index["weight_map"][name], "pt") as f:
            assert f.get_slice(name).get_dtype() == dtype, name
    for file in files:
        with safe_open(checkpoint / file, "pt") as f:
            total += len(list(f.keys()))
    assert total == len(index["weight_map"])
    tid2eid = _file_tensor(checkpoint, index, "layers.0.ffn.gate.tid2eid")
    assert tid2eid.shape == (config.vocab_size, config.num_experts_per_tok)
    assert (tid2eid.sort(dim=-1).values.diff(dim=-1) > 0).all()  # distinct experts per token


def _file_tensor(checkpoint, index, name):
    with safe_open(checkpoint / index["weight_map"][name], "pt") as f:
        return f.get_tensor(name)


def _module(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def test_loads_back_to_the_quantised_values(model):
    config = ModelConfig.tiny()
    checked = {fmt: 0 for fmt in WeightFormat}
    for spec, value in random_tensors(config, SEED):
        if spec.fmt is None:
            tensor = _module(model, spec.name)
            assert torch.equal(tensor, value.to(spec.dtype).to(tensor.dtype)), spec.name
            continue
        linear = _module(model, spec.name.removesuffix(".weight"))
        if ".experts." in spec.name and not spec.name.startswith("mtp."):
            assert linear.format == WeightFormat.INT2  # the INT2 files replaced them
            continue
        dense = linear.dense_weight(torch.float32)
        if spec.fmt == WeightFormat.FP8:
            expected = fm.dequantize_fp8(*fm.quantize_fp8(value), torch.float32)
            bound = value.abs() * 2**-4 + 2**-9 * value.abs().max()  # 3 mantissa bits + subnormals
        elif spec.fmt == WeightFormat.FP4:
            expected = fm.dequantize_fp4(*fm.quantize_fp4(value), torch.float32)
            bound = torch.full_like(value, value.abs().max() / 6 * 2)  # one scale unit (gap 4..6 / 2)
        else:
            expected = value.to(torch.bfloat16).float()
            bound = value.abs() * 2**-8
        assert linear.format == spec.fmt, spec.name
        assert torch.equal(dense, expected), spec.name
        assert torch.all((dense - value).abs() <= bound), spec.name
        checked[spec.fmt] += 1
    assert checked[WeightFormat.FP8] and checked[WeightFormat.FP4] and checked[WeightFormat.DENSE]

    for layer, proj, value in random_int2_experts(config, SEED):
        packed, scale, zeros = fm.quantize_int2(value)
        step = scale.float().repeat_interleave(fm.INT2_GROUP, dim=-1)
        for e in range(config.n_routed_experts):
            linear = model.layers[layer].ffn.experts[e].get_submodule(proj)
            dense = linear.dense_weight(torch.float32)
            assert torch.equal(dense, fm.dequantize_int2(packed[e], scale[e], zeros[e], torch.float32))
            assert torch.all((dense - value[e]).abs() <= step[e] * 0.5 * (1 + 1e-3))


def test_layout_names_are_the_model_paths():
    config = ModelConfig.tiny()
    with torch.device("meta"):
        fresh = Transformer(config)  # every Linear still dense: state_dict has no .scale
    assert {spec.name for spec in release_layout(config)} == set(fresh.state_dict())


def test_the_loaded_model_runs(model):
    state = model.new_state(batch_size=1, max_len=64)
    logits = model(torch.tensor([[0, 5, 7, 9, 100]]), state, last_only=True)
    assert logits.shape == (1, 129280) and torch.isfinite(logits).all()
    # O(1) activations: the logits of a random model are not blown up or collapsed.
    assert 0.05 < logits.std() < 20


def test_refuses_the_real_shape(tmp_path):
    with pytest.raises(ValueError, match="only 'tiny'"):
        write_checkpoint(tmp_path, "flash")
