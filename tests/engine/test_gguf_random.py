"""engine/gguf_random.py: a random model in ds4's GGUF layout, made without a file, holds
every projection in ds4's type (experts as views of one stack per layer) and runs."""

from __future__ import annotations

import torch

from engine import formats as fm
from engine.formats import WeightFormat
from engine.gguf import StoredEmbedding, ds4_name
from engine.gguf_random import random_blocks, random_gguf_model
from engine.linear import Linear
from engine.make_checkpoint import ds4_format, gguf_config


def test_blocks_decode_to_the_asked_spread():
    g = torch.Generator().manual_seed(0)
    for fmt in (WeightFormat.Q8_0, WeightFormat.Q2_K, WeightFormat.IQ2_XXS):
        w = fm.dequantize_ggml(fmt, random_blocks(fmt, (64, 1024), 1 / 32, g, torch.device("cpu")),
                               torch.float32)
        assert abs(float(w.std()) * 32 - 1) < 0.1, fmt  # f16 scale rounding + sampling
        assert abs(float(w.mean())) < 0.1 / 32, fmt


def test_the_model_is_in_ds4_s_layout_and_runs():
    c = gguf_config().replace(vocab_size=4096, num_nextn_predict_layers=0)
    model = random_gguf_model(c, "cpu", seed=1)
    checked = 0
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            name, _ = ds4_name(f"{path}.weight")
            fmt = ds4_format(name)
            if fmt is None:
                assert module.format == WeightFormat.DENSE and module.weight.dtype == torch.float16, path
            else:
                assert module.format == fmt, path
            checked += 1
    assert checked > 100
    assert isinstance(model.embed, StoredEmbedding) and model.embed.weight.dtype == torch.float16
    experts = model.layers[2].ffn.experts
    assert len({e.w2.weight.untyped_storage().data_ptr() for e in experts}) == 1  # views
    logits = model(torch.tensor([[0, 5, 7, 9, 100]]), model.new_state(1, 16), last_only=True)
    assert torch.isfinite(logits).all() and 0.05 < logits.std() < 20
