"""A random model in ds4's GGUF layout, made directly on a device (no file), at any shape.

    model = random_gguf_model(ModelConfig.flash().replace(num_nextn_predict_layers=0), "cuda")

What `engine.gguf.load_gguf_model` builds from ds4's 81 GB file, without the file: every
projection in ds4's GGML type (routed gate/up IQ2_XXS, down Q2_K, attention / shared expert /
head Q8_0, the rest F16) held by its Linear as blocks, each layer's routed experts one stack
per projection and each expert a view of it, as the loader does. It exists to measure the
GGUF path at the real V4-Flash shape (bytes read per token, tok/s) where the file cannot be
downloaded.

Blocks are uniform random bytes (every bit pattern is a valid block) whose f16 scales are set
so that the decoded weights have std ~ 1/sqrt(fan_in): the std of one block decoded with
scale 1 is measured, and the scale is its inverse times the target. Other tensors follow
make_checkpoint's rules (norms 1, "small" 0.1 N(0,1), embedding N(0,1), matrices
N(0, 1/fan_in), distinct experts per token in tid2eid), drawn on the device in the dtype the
model declares (the embedding in F16, as ds4 stores it).
"""

from __future__ import annotations

import torch
from torch import nn

from engine import formats as fm
from engine.config import ModelConfig
from engine.formats import WeightFormat
from engine.gguf import StoredEmbedding, ds4_name
from engine.linear import Linear
from engine.make_checkpoint import TensorSpec, ds4_format, release_layout
from engine.model import Transformer

_F16_FIELDS = {WeightFormat.Q8_0: (0,), WeightFormat.Q2_K: (80, 82), WeightFormat.IQ2_XXS: (0,)}
_ROWS_CHUNK = 1 << 14  # tid2eid rows ranked at once


def _set_scales(blocks: torch.Tensor, fmt: WeightFormat, d: float) -> None:
    """Every block's f16 scale to d (Q2_K: dmin to 1.5 d, the mean of scale * code against
    min, so the weights centre on 0)."""
    for offset, value in zip(_F16_FIELDS[fmt], (d, 1.5 * d), strict=False):
        bits = torch.tensor([value], dtype=torch.float16, device=blocks.device).view(torch.uint8)
        blocks[:, offset : offset + 2] = bits


def random_blocks(fmt: WeightFormat, shape: tuple[int, ...], std: float, g: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """uint8 [..., out, in / B * S] random `fmt` blocks decoding to mean ~ 0, std ~ `std`."""
    *lead, rows, k = shape
    packed = torch.randint(0, 256, (*lead, rows, fm.ggml_row_bytes(fmt, k)), dtype=torch.uint8,
                           generator=g, device=device)
    blocks = packed.view(-1, fm.GGML_BLOCKS[fmt][1])
    probe = blocks[:64].clone()
    _set_scales(probe, fmt, 1.0)
    unit = float(fm.dequantize_ggml(fmt, probe.view(1, -1), torch.float32).std())
    _set_scales(blocks, fmt, std / unit)
    return packed


def _plain(spec: TensorSpec, c: ModelConfig, g: torch.Generator, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    if spec.init == "ones":
        return torch.ones(spec.shape, device=device, dtype=dtype)
    if spec.init == "tid2eid":
        out = torch.empty(c.vocab_size, c.num_experts_per_tok, dtype=torch.int64, device=device)
        for lo in range(0, c.vocab_size, _ROWS_CHUNK):
            ranks = torch.rand(min(_ROWS_CHUNK, c.vocab_size - lo), c.n_routed_experts,
                               generator=g, device=device)
            out[lo : lo + ranks.shape[0]] = ranks.argsort(dim=-1)[:, : c.num_experts_per_tok]
        return out
    std = {"small": 0.1, "embed": 1.0}.get(spec.init, spec.shape[-1] ** -0.5)
    return (torch.randn(spec.shape, generator=g, device=device) * std).to(dtype)


@torch.no_grad()
def random_gguf_model(config: ModelConfig, device: str | torch.device | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """`Transformer(config, dtype)` built on meta and filled in ds4's layout on `device`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    modules = dict(model.named_modules())
    g = torch.Generator(device=device).manual_seed(seed)
    stacks: dict[str, torch.Tensor] = {}
    for spec in release_layout(config):
        name, expert = ds4_name(spec.name)
        fmt = ds4_format(name)
        path, _, leaf = spec.name.rpartition(".")
        module = modules[path]
        if isinstance(module, Linear) and leaf == "weight":
            if fmt is None:  # an F16 projection (router, compressors, indexer)
                module.load_dense(_plain(spec, config, g, device, torch.float16), name=name)
            elif expert is None:
                module.load_ggml(fmt, random_blocks(fmt, spec.shape, spec.shape[-1] ** -0.5, g,
                                                    device), name=name)
            else:
                if name not in stacks:
                    block = ".".join(name.split(".")[:2])  # `blk.L` / `mtp.K`
                    if any(not n.startswith(block + ".") for n in stacks):
                        stacks.clear()  # one layer's stacks at a time
                    shape = (config.n_routed_experts, *spec.shape)
                    stacks[name] = random_blocks(fmt, shape, spec.shape[-1] ** -0.5, g, device)
                module.load_ggml(fmt, stacks[name][expert], name=f"{name}[{expert}]")
        elif isinstance(module, nn.Embedding):
            weight = _plain(spec, config, g, device, torch.float16)
            setattr(model, path, StoredEmbedding(weight, dtype))
        else:
            target = getattr(module, leaf)
            value = _plain(spec, config, g, device, target.dtype)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[leaf] = value
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"ds4's layout does not cover these model tensors: {left[:10]}")
    return model.eval()
