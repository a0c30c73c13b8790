"""engine.random_weights on the tiny configuration (CPU): the release's names, dtypes and
shapes, sane dequantised values, a finite forward, determinism per seed."""

from __future__ import annotations

import pytest
import torch

from engine import formats as fm
from engine.config import ModelConfig
from engine.formats import WeightFormat
from engine.linear import Linear
from engine.make_checkpoint import _stored, release_layout
from engine.random_weights import random_model, stored_tensors

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="module")
def int2_model(config):
    return random_model(config, device="cpu", seed=0, experts="int2")


@pytest.fixture(scope="module")
def release_model(config):
    return random_model(config, device="cpu", seed=0, experts="release")


def _is_main_routed(name: str) -> bool:
    return name.startswith("layers.") and ".ffn.experts." in name


def _expected(config: ModelConfig, int2: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a release checkpoint holds per name (make_checkpoint's own writer on zeros),
    with the main layers' routed experts replaced by INT2-G64 when `int2`."""
    out = {}
    for spec in release_layout(config):
        if int2 and _is_main_routed(spec.name):
            path = spec.name.removesuffix(".weight")
            shapes = fm.int2_shapes(*spec.shape)
            dtypes = (torch.uint32, torch.float16, torch.int8)
            for field, shape, dtype in zip(fm.INT2_FIELDS, shapes, dtypes, strict=True):
                out[f"{path} {field}"] = (shape, dtype)
            continue
        for name, t in _stored(spec, torch.zeros(spec.shape)).items():
            out[name] = (tuple(t.shape), t.dtype)
    return out


@pytest.mark.parametrize("mode", ["int2", "release"])
def test_names_dtypes_shapes_match_the_release(config, int2_model, release_model, mode):
    model = int2_model if mode == "int2" else release_model
    found = {k: (tuple(t.shape), t.dtype) for k, t in stored_tensors(model).items()}
    want = _expected(config, int2=mode == "int2")
    assert sorted(found) == sorted(want)
    wrong = {k: (found[k], want[k]) for k in want if found[k] != want[k]}
    assert not wrong
    assert not any(t.is_meta for t in stored_tensors(model).values())


def test_formats_per_linear(int2_model):
    formats = {}
    for path, m in int2_model.named_modules():
        if isinstance(m, Linear):
            formats[path] = m.format
    assert formats["layers.3.ffn.experts.5.w2"] == WeightFormat.INT2
    assert formats["mtp.0.ffn.experts.5.w2"] == WeightFormat.FP4  # INT2 covers main layers only
    assert formats["layers.3.attn.wq_b"] == WeightFormat.FP8
    assert formats["layers.3.ffn.shared_experts.w1"] == WeightFormat.FP8
    assert formats["head"] == WeightFormat.DENSE
    assert formats["layers.2.attn.compressor.wkv"] == WeightFormat.DENSE
    # the experts of a layer are slices of one stacked tensor per projection (as the INT2
    # release's layer files are, and as engine.weights loads them)
    w0 = int2_model.layers[0].ffn.experts[0].w1.weight
    w1 = int2_model.layers[0].ffn.experts[1].w1.weight
    assert w0.untyped_storage().data_ptr() == w1.untyped_storage().data_ptr()


def _stats(w: torch.Tensor) -> tuple[float, float]:
    w = w.float()
    return w.mean().item(), w.std().item()


@pytest.mark.parametrize(
    "path",
    [
        "layers.3.ffn.experts.7.w1",  # INT2 [128, 256]
        "layers.3.ffn.experts.7.w2",  # INT2 [256, 128]
        "mtp.0.ffn.experts.1.w3",  # FP4
        "layers.2.attn.wq_b",  # FP8
        "layers.4.attn.wo_a",  # FP8
        "layers.1.ffn.shared_experts.w2",  # FP8
        "head",  # BF16
    ],
)
def test_dequantised_values_are_sane(int2_model, path):
    linear = dict(int2_model.named_modules())[path]
    w = linear.dense_weight(torch.float32)
    assert w.shape == (linear.out_features, linear.in_features)
    assert torch.isfinite(w).all()
    mean, std = _stats(w)
    target = linear.in_features**-0.5
    assert abs(mean) < 0.1 * target
    assert 0.7 * target < std < 1.4 * target, (path, std, target)


def test_int2_codes_and_zeros(int2_model):
    e = int2_model.layers[4].ffn.experts[3].w1
    q = fm.unpack_int2(e.weight)
    counts = torch.bincount(q.flatten().long(), minlength=4).float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.01  # uniform 2-bit codes
    z = fm.unpack_int4_zeros(e.zero)
    assert set(z.unique().tolist()) == {1, 2}
    assert e.scale.dtype == torch.float16 and (e.scale > 0).all()


def test_plain_tensors(config, int2_model):
    m = int2_model
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
    assert m.layers[0].hc_attn_fn.dtype == torch.float32
    tid2eid = m.layers[1].ffn.gate.tid2eid
    assert tid2eid.dtype == torch.int64 and tid2eid.shape == (config.vocab_size,
                                                              config.num_experts_per_tok)
    assert tid2eid.min() >= 0 and tid2eid.max() < config.n_routed_experts
    rows = tid2eid[:1000].sort(dim=-1).values
    assert (rows[:, 1:] != rows[:, :-1]).all()  # distinct experts per token
    assert m.layers[3].ffn.gate.bias.dtype == torch.float32
    assert abs(m.embed.weight.float().std().item() - 1.0) < 0.05


@pytest.mark.parametrize("mode", ["int2", "release"])
def test_forward_is_finite(int2_model, release_model, mode):
    model = int2_model if mode == "int2" else release_model
    tokens = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    state = model.new_state(1, 16)
    logits = model(tokens, state, last_only=True)
    assert logits.shape == (1, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert 0.1 < logits.std().item() < 100
    step = model(logits.argmax(-1, keepdim=True), state, last_only=True)
    assert torch.isfinite(step).all()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # any dtype, compared bit for bit


def test_deterministic_per_seed(config, int2_model):
    first = stored_tensors(int2_model)
    again = stored_tensors(random_model(config, device="cpu", seed=0, experts="int2"))
    assert all(torch.equal(_bytes(first[k]), _bytes(again[k])) for k in first)
    other = stored_tensors(random_model(config, device="cpu", seed=1, experts="int2"))
    for k in ("layers.2.attn.wq_a.weight", "layers.3.ffn.experts.0.w1 w_packed", "head.weight",
              "layers.0.ffn.gate.tid2eid"):
        assert not torch.equal(_bytes(first[k]), _bytes(other[k]))


def test_bad_mode(config):
    with pytest.raises(ValueError, match="experts"):
        random_model(config, device="cpu", experts="int4")
