"""The GGML block formats of ds4's GGUF (Q8_0, Q2_K, IQ2_XXS): engine.formats' PyTorch
decoding against the `gguf` package's own numpy decoding, bit for bit, on arbitrary blocks
and on blocks from this engine's quantisers; hand-built blocks pin the bit layouts."""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GT
from gguf import quants

from engine import formats as fm
from engine.formats import WeightFormat
from engine.linear import Linear

GGML_TYPES = {WeightFormat.Q8_0: GT.Q8_0, WeightFormat.Q2_K: GT.Q2_K,
              WeightFormat.IQ2_XXS: GT.IQ2_XXS}
F16_FIELDS = {WeightFormat.Q8_0: (0,), WeightFormat.Q2_K: (80, 82), WeightFormat.IQ2_XXS: (0,)}
FORMATS = list(GGML_TYPES)


def _gguf_dequant(fmt: WeightFormat, packed: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(packed.numpy(), GGML_TYPES[fmt]))


def _random_blocks(fmt: WeightFormat, shape: tuple[int, ...], in_features: int,
                   g: torch.Generator) -> torch.Tensor:
    """Uniform random bytes (every bit pattern of codes, scales, signs and grid indices is
    valid) with the f16 fields replaced by finite normal values."""
    packed = torch.randint(0, 256, (*shape, fm.ggml_row_bytes(fmt, in_features)),
                           dtype=torch.uint8, generator=g)
    blocks = packed.view(*shape, -1, fm.GGML_BLOCKS[fmt][1])
    for offset in F16_FIELDS[fmt]:
        d = torch.randn(blocks.shape[:-1], generator=g).to(torch.float16)
        blocks[..., offset : offset + 2] = d.view(torch.int16).unsqueeze(-1).view(torch.uint8)
    return packed


def test_block_sizes_are_the_gguf_package_s():
    for fmt, t in GGML_TYPES.items():
        assert fm.GGML_BLOCKS[fmt] == gguf.GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5)])  # (3, 5): stacked experts
def test_random_blocks_decode_as_gguf_decodes_them(fmt, shape):
    g = torch.Generator().manual_seed(zlib.crc32(f"{fmt.value}{shape}".encode()))
    for in_features in (256, 768):
        packed = _random_blocks(fmt, shape, in_features, g)
        mine = fm.dequantize_ggml(fmt, packed, torch.float32)
        assert mine.shape == (*shape, in_features)
        assert torch.equal(mine, _gguf_dequant(fmt, packed))


@pytest.mark.parametrize("fmt", FORMATS)
def test_own_quantisers_write_blocks_gguf_reads_back(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, 512, generator=g) * 0.05
    packed = fm.quantize_ggml(fmt, w)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 6, fm.ggml_row_bytes(fmt, 512))
    decoded = _gguf_dequant(fmt, packed)
    assert torch.equal(fm.dequantize_ggml(fmt, packed, torch.float32), decoded)
    # close to what was quantised: 8 bits are tight; the 2-bit formats give ~0.3-0.4 on
    # Gaussian weights (random rounding would be > 1)
    bound = {WeightFormat.Q8_0: 0.01, WeightFormat.Q2_K: 0.4, WeightFormat.IQ2_XXS: 0.45}[fmt]
    assert fm.relative_error(decoded, w) < bound


def test_q8_0_is_the_reference_quantiser_within_half_a_step():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    packed = fm.quantize_q8_0(w)
    assert torch.equal(packed, torch.from_numpy(quants.quantize(w.numpy(), GT.Q8_0)))
    step = w.view(3, 2, 32).abs().amax(-1, keepdim=True) / 127
    err = (fm.dequantize_q8_0(packed).view(3, 2, 32) - w.view(3, 2, 32)).abs()
    # half a step, plus the f16 rounding of d (2^-11 relative) times |q| <= 127
    assert torch.all(err <= step * (0.5 + 127 * 2**-11) + 1e-7)


def _f16_le(x: float) -> list[int]:
    return list(np.float16(x).tobytes())


def test_q8_0_hand_block():
    q = np.arange(-16, 16, dtype=np.int8)
    block = torch.tensor(_f16_le(0.5) + list(q.view(np.uint8)), dtype=torch.uint8)
    expected = torch.from_numpy(q.astype(np.float32) * 0.5)
    assert torch.equal(fm.dequantize_q8_0(block), expected)
    assert torch.equal(_gguf_dequant(WeightFormat.Q8_0, block), expected)


def test_q2_k_hand_block():
    """Value i = h*128 + 32*s + j sits in byte 16 + 32*h + j at bits 2s; group i // 16 has
    scale byte i // 16 (low nibble scale, high nibble min)."""
    codes = np.arange(256) % 4
    codes[5] = 3  # one more, so that a code-order mix-up cannot cancel out
    qs = np.zeros(64, dtype=np.uint8)
    for i, c in enumerate(codes):
        h, s, j = i // 128, (i % 128) // 32, i % 32
        qs[32 * h + j] |= c << (2 * s)
    scale, minimum = np.arange(16) % 16, (15 - np.arange(16)) % 16
    scales = (scale | (minimum << 4)).astype(np.uint8)
    d, dmin = 0.25, 0.125
    block = torch.tensor(list(scales) + list(qs) + _f16_le(d) + _f16_le(dmin), dtype=torch.uint8)
    group = np.arange(256) // 16
    expected = torch.tensor(d * scale[group] * codes - dmin * minimum[group], dtype=torch.float32)
    assert torch.equal(fm.dequantize_q2_k(block), expected)
    assert torch.equal(_gguf_dequant(WeightFormat.Q2_K, block), expected)


def test_iq2_xxs_hand_block():
    """Sub-block 0: grid row 0 (all 8s), sign index 1 (element 0 and, by parity, 7
    negative), scale 3: 1.0 * 3.5 / 4 * 8 = 7. Sub-block 1: scale 0, grid row 1, no signs."""
    subs = []
    for k in range(8):
        grid_idx = [0, 0, 0, 0] if k != 1 else [1, 1, 1, 1]
        aux1 = (1 if k == 0 else 0) | ((3 if k == 0 else 0) << 28)
        subs += grid_idx + list(np.uint32(aux1).tobytes())
    block = torch.tensor(_f16_le(1.0) + subs, dtype=torch.uint8)
    out = _gguf_dequant(WeightFormat.IQ2_XXS, block)
    assert torch.equal(fm.dequantize_iq2_xxs(block), out)
    assert out[:8].tolist() == [-7.0, 7, 7, 7, 7, 7, 7, -7.0]
    assert torch.equal(out[8:32], torch.full((24,), 7.0))
    grid, _ = fm._iq2_tables("cpu")
    assert torch.equal(out[32:40], grid[1] * 0.5 * 0.25)  # scale 0: d * 0.5 / 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_keeps_blocks_and_decodes_per_call(fmt):
    g = torch.Generator().manual_seed(4)
    linear = Linear(512, 24, dtype=torch.float32)
    packed = fm.quantize_ggml(fmt, torch.randn(24, 512, generator=g) * 0.05)
    linear.load_ggml(fmt, packed, name="blk.0.x.weight")
    assert linear.format == fmt and linear.weight.data_ptr() == packed.data_ptr()  # no copy
    x = torch.randn(3, 512, generator=g)
    assert torch.equal(linear(x), F.linear(x, _gguf_dequant(fmt, packed)))
    with pytest.raises(ValueError, match=r"blk.0.x.weight: expected shape"):
        linear.load_ggml(fmt, packed[:, :-2], name="blk.0.x.weight")
    with pytest.raises(TypeError, match="expected dtype uint8"):
        linear.load_ggml(fmt, packed.view(torch.int8), name="blk.0.x.weight")
    with pytest.raises(ValueError, match="divisible"):
        Linear(100, 4).stored_spec(fmt)
