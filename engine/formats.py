"""Every stored weight format, packed and unpacked in one place.

Three formats besides plain BF16 (engine.md section 4):

- FP8: `weight [out, in]` float8_e4m3fn with `scale [ceil(out/128), ceil(in/128)]` E8M0,
  `W[i, j] = e4m3(w[i, j]) * 2^(s[i // 128, j // 128] - 127)`. The release stores E8M0 as
  safetensors `F8_E8M0` (torch.float8_e8m0fnu); a uint8 view of the same bytes is accepted.
- FP4 (routed experts of the release): `weight [out, in / 2]` int8, two E2M1 codes per byte,
  the LOW nibble holding the even input index; code bit 3 is the sign, bits 0..2 index
  `[0, .5, 1, 1.5, 2, 3, 4, 6]`. `scale [out, in / 32]` E8M0, one per 32 inputs of a row.
- INT2-G64 (Infatoshi/DeepSeek-V4-Flash-INT2-G64, routed experts only), per projection
  `w_packed [.., out, in / 16]` uint32, `w_scale [.., out, in / 64]` fp16,
  `w_zero_packed [.., out, in / 128]` int8, `w = (q - z) * s`.
  UNCONFIRMED against real files: value k of a word at bits 2k..2k+1, zeros two per byte
  low nibble first, and the plain `(q - z)` zero convention are GPTQ's defaults (the model
  card says "standard GPTQ" and no more). If a real file disagrees, change
  `unpack_int2` / `unpack_int4_zeros` here and nothing else: the loader compares a few
  INT2 experts with the release's FP4 ones and, when the default does not fit, names the
  alternative that does (`Int2Convention`, at the end of this module).

- GGML block formats (antirez's ds4 GGUF of V4-Flash; `engine.gguf` loads it): each row
  is a run of raw blocks, exactly as the file stores them, `weight [out, in / B * S]` uint8
  (B values in S bytes). Q8_0 (B 32, S 34): f16 `d`, 32 int8 `q`, `w = d * q`. Q2_K (B 256,
  S 84): 16 bytes of 4-bit scale (low) / min (high) per 16 values, 64 bytes of 2-bit codes,
  f16 `d` and `dmin`, `w = d * scale * q - dmin * min`. IQ2_XXS (B 256, S 66): f16 `d`,
  then per 32 values two little-endian words: 4 byte indices into a 256 x 8 grid of
  magnitudes, and 4 x 7 sign bits (the 8th sign is the parity) with a 4-bit scale on top,
  `w = d * (0.5 + scale) / 4 * grid * sign`. Its grid and sign tables are read from the
  `gguf` package at run time (`_iq2_tables`), not copied here. Each `dequantize_*` repeats
  the `gguf` package's own numpy decoding operation for operation in float32, so the two
  agree bit for bit (tests/engine/test_gguf_formats.py).

Dequantisation is exact: e4m3 and e2m1 values times a power of two fit bf16 and fp32
without rounding (3 and 1 mantissa bits against bf16's 7), so a round trip through the
packers returns the quantised values bit for bit.

The quantisers (`quantize_*`) exist for tests and `engine.make_checkpoint`; they are
round-to-nearest, not the release's own quantisation recipe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

import torch


class WeightFormat(StrEnum):
    """How a Linear's weight is stored."""

    DENSE = "dense"  # bf16 / fp16 / fp32 [out, in]
    FP8 = "fp8"      # float8_e4m3fn [out, in] + E8M0 [ceil(out/128), ceil(in/128)]
    FP4 = "fp4"      # int8 [out, in/2] + E8M0 [out, in/32]
    INT2 = "int2"    # uint32 [out, in/16] + fp16 [out, in/64] + int8 [out, in/128]
    Q8_0 = "q8_0"    # uint8 [out, in/32 * 34]: GGML blocks (ds4's GGUF)
    Q2_K = "q2_k"    # uint8 [out, in/256 * 84]
    IQ2_XXS = "iq2_xxs"  # uint8 [out, in/256 * 66]


FP8_BLOCK = 128        # FP8 scales cover 128 x 128 weight blocks
FP4_GROUP = 32         # FP4 scales cover 32 consecutive inputs of one row
INT2_GROUP = 64        # INT2 scales and zeros cover 64 consecutive inputs of one row
INT2_PER_WORD = 16     # 2-bit values in one uint32
E8M0_BIAS = 127
FP8_MAX = 448.0        # largest finite float8_e4m3fn
FP4_MAX = 6.0          # largest e2m1 magnitude
INT2_MAX_Q = 3

E8M0_DTYPES = (torch.float8_e8m0fnu, torch.uint8)
DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# e2m1 code -> value; codes 8..15 are the negatives (8 is -0.0).
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor([*_E2M1_MAGNITUDES, *(-v for v in _E2M1_MAGNITUDES)])
# Rounding boundaries between consecutive magnitudes (round to nearest; ties go down).
_E2M1_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in pairwise(_E2M1_MAGNITUDES)])


# -- E8M0 ----------------------------------------------------------------------------------


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (float8_e8m0fnu or uint8) -> float32 powers of two `2^(s - 127)`."""
    if scale.dtype not in E8M0_DTYPES:
        raise TypeError(f"E8M0 scale must be float8_e8m0fnu or uint8, got {scale.dtype}")
    # exp2 of an integer-valued float32 is exact over the whole E8M0 range (2^-127 is a
    # float32 subnormal); byte 255 (NaN in E8M0) becomes 2^128 = inf, never a valid scale.
    return torch.exp2(scale.view(torch.uint8).float() - E8M0_BIAS)


def e8m0_for(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """Smallest power-of-two scale (as float8_e8m0fnu) with `amax / scale <= max_code`."""
    exponent = torch.ceil(torch.log2(amax.float().clamp(min=1e-30) / max_code))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    return (exponent + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def _expand(scale: torch.Tensor, rows: int, cols: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Repeat each scale over its rows x cols block and crop to `shape` (last two dims)."""
    out = scale.repeat_interleave(rows, dim=-2) if rows > 1 else scale
    out = out.repeat_interleave(cols, dim=-1)
    return out[..., : shape[-2], : shape[-1]]


# -- FP8 E4M3, 128 x 128 block scales --------------------------------------------------------


def fp8_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], E8M0 [ceil(out/128), ceil(in/128)])."""
    out_features, in_features = w.shape
    rows, cols = fp8_scale_shape(out_features, in_features)
    padded = w.new_zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=torch.float32)
    padded[:out_features, :in_features] = w.float()
    amax = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK).abs().amax(dim=(1, 3))
    scale = e8m0_for(amax, FP8_MAX)
    factor = _expand(e8m0_to_float(scale), FP8_BLOCK, FP8_BLOCK, w.shape)
    # The cast saturates at +-448; the clamp only guards log2 rounding at exact powers.
    q = (w.float() / factor).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn [out, in] with E8M0 block scales -> dense [out, in] of `dtype`."""
    factor = _expand(e8m0_to_float(scale), FP8_BLOCK, FP8_BLOCK, weight.shape)
    return (weight.float() * factor).to(dtype)


# -- FP4 E2M1, two per byte, E8M0 per 32 inputs ----------------------------------------------


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes [..., in] (0..15) -> int8 [..., in/2]; even input index in the LOW nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even input size, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., in/2] -> e2m1 codes uint8 [..., in] (inverse of `pack_fp4`)."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in/2], E8M0 [out, in/32]); round to nearest e2m1."""
    out_features, in_features = w.shape
    if in_features % FP4_GROUP:
        raise ValueError(f"FP4 needs in_features divisible by {FP4_GROUP}, got {in_features}")
    groups = w.float().view(out_features, in_features // FP4_GROUP, FP4_GROUP)
    scale = e8m0_for(groups.abs().amax(dim=-1), FP4_MAX)
    x = groups / e8m0_to_float(scale).unsqueeze(-1)
    magnitude = torch.bucketize(x.abs().clamp(max=FP4_MAX), _E2M1_MIDPOINTS.to(x.device))
    codes = magnitude.to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)
    return pack_fp4(codes.view(out_features, in_features)), scale


def dequantize_fp4(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [out, in/2] packed e2m1 with E8M0 [out, in/32] -> dense [out, in] of `dtype`."""
    values = E2M1_VALUES.to(weight.device)[unpack_fp4(weight).long()]
    factor = e8m0_to_float(scale).repeat_interleave(FP4_GROUP, dim=-1)
    return (values * factor).to(dtype)


# -- INT2-G64, GPTQ-style (unconfirmed conventions, see the module docstring) ----------------


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """2-bit values [..., in] (0..3) -> uint32 [..., in/16]; value k of a word at bits 2k..2k+1."""
    if q.shape[-1] % INT2_PER_WORD:
        raise ValueError(f"INT2 packing needs in divisible by {INT2_PER_WORD}, got {q.shape[-1]}")
    q = q.to(torch.int64).view(*q.shape[:-1], -1, INT2_PER_WORD)
    shifts = torch.arange(0, 2 * INT2_PER_WORD, 2, device=q.device)
    words = (q << shifts).sum(dim=-1)  # < 2^32, exact in int64
    # torch has no uint32 arithmetic on the CPU: reinterpret the same bits through int32.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.view(torch.uint32)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """uint32 [..., in/16] -> uint8 [..., in] values 0..3 (inverse of `pack_int2`)."""
    words = packed.view(torch.int32).unsqueeze(-1)
    shifts = torch.arange(0, 2 * INT2_PER_WORD, 2, device=packed.device, dtype=torch.int32)
    # An arithmetic shift copies the sign bit down, but `& 3` keeps only the wanted pair.
    return ((words >> shifts) & 3).to(torch.uint8).flatten(-2)


def pack_int4_zeros(z: torch.Tensor) -> torch.Tensor:
    """4-bit zeros [..., groups] (0..15) -> int8 [..., groups/2], even group in the LOW nibble."""
    if z.shape[-1] % 2:
        raise ValueError(f"zero packing needs an even number of groups, got {z.shape[-1]}")
    z = z.to(torch.uint8)
    return (z[..., 0::2] | (z[..., 1::2] << 4)).view(torch.int8)


def unpack_int4_zeros(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., groups/2] -> uint8 [..., groups] (inverse of `pack_int4_zeros`)."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


# File and key names of the INT2-G64 release. UNCONFIRMED: the model card names the files
# (`layer_NN.safetensors`, one per MoE layer) and the three fields per projection, but not
# how keys join them; `w1.w_packed` is this engine's guess. Kept here with the bit layouts.
INT2_FIELDS = ("w_packed", "w_scale", "w_zero_packed")


def int2_file_name(layer: int) -> str:
    return f"layer_{layer:02d}.safetensors"


def int2_key(proj: str, field: str) -> str:
    """Key of one field of one routed projection (`w1`, `w2`, `w3`) inside a layer file."""
    return f"{proj}.{field}"


def int2_shapes(out_features: int, in_features: int) -> tuple[tuple[int, int], ...]:
    """Shapes of (w_packed, w_scale, w_zero_packed) for one [out, in] projection."""
    if in_features % (2 * INT2_GROUP):
        raise ValueError(f"INT2-G64 needs in_features divisible by {2 * INT2_GROUP}, got {in_features}")
    return ((out_features, in_features // INT2_PER_WORD),
            (out_features, in_features // INT2_GROUP),
            (out_features, in_features // (2 * INT2_GROUP)))


def quantize_int2(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (w_packed uint32, w_scale fp16, w_zero_packed int8), min/max RTN.

    As GPTQ does, each group's range is widened to include 0, so the zero point lies in
    0..3 and every weight is within half a step of the grid.
    """
    *lead, in_features = w.shape
    int2_shapes(1, in_features)  # divisibility check
    groups = w.float().reshape(*lead, in_features // INT2_GROUP, INT2_GROUP)
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    # fp16 first, so that q and z are chosen against the scale the file will hold; rounded
    # up (1 + 2^-10 beats fp16's 2^-11 rounding) so three steps still span [lo, hi].
    scale = ((hi - lo) / INT2_MAX_Q * (1 + 2**-10)).clamp(min=1e-4).to(torch.float16)
    s = scale.float()
    z = torch.round(-lo / s).clamp(0, INT2_MAX_Q)
    q = torch.round(groups / s.unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, INT2_MAX_Q)
    return pack_int2(q.reshape(w.shape)), scale, pack_int4_zeros(z)


def dequantize_int2(w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero_packed: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """INT2-G64 [..., out, in/16] + scales + zeros -> dense [..., out, in] of `dtype`."""
    q = unpack_int2(w_packed).float()
    z = unpack_int4_zeros(w_zero_packed).float().repeat_interleave(INT2_GROUP, dim=-1)
    s = w_scale.float().repeat_interleave(INT2_GROUP, dim=-1)
    return ((q - z) * s).to(dtype)


# -- INT2 conventions: detection against the FP4 release ------------------------------------
#
# The loader checks a few INT2 experts against the FP4 originals the release ships beside
# them (engine.weights); when the default above does not fit, these alternatives say which
# one does. They are for that diagnosis only: the engine loads the default, so a file that
# fits another convention is refused, naming it, until the unpacking above is changed.

INT2_FIT_MAX = 0.8  # relative error of a fitting 2-bit quantisation (~0.45 RTN, Gaussian)


@dataclass(frozen=True, slots=True)
class Int2Convention:
    """One way of reading the three INT2-G64 fields."""

    msb_first: bool = False  # value k of a word at bits 30-2k..31-2k (default: 2k..2k+1)
    zeros_high_first: bool = False  # even group's zero in the HIGH nibble (default: low)
    zero_offset: int = 0  # w = (q - (z + offset)) * s; 1 is AutoGPTQ's stored `z - 1`

    def describe(self) -> str:
        bits = ("value k at bits 30-2k..31-2k (most significant first)" if self.msb_first
                else "value k at bits 2k..2k+1")
        nibbles = "zeros high nibble first" if self.zeros_high_first else "zeros low nibble first"
        zero = f"w = (q - (z + {self.zero_offset}))*s" if self.zero_offset else "w = (q - z)*s"
        return f"{bits}, {nibbles}, {zero}"


INT2_DEFAULT = Int2Convention()
INT2_CONVENTIONS = tuple(
    Int2Convention(msb, high, offset)
    for offset in (0, 1) for high in (False, True) for msb in (False, True)
)  # the default first


def dequantize_int2_as(convention: Int2Convention, w_packed: torch.Tensor,
                       w_scale: torch.Tensor, w_zero_packed: torch.Tensor) -> torch.Tensor:
    """`dequantize_int2` (float32) read under `convention`; the default gives the same."""
    q = unpack_int2(w_packed)
    if convention.msb_first:
        q = q.unflatten(-1, (-1, INT2_PER_WORD)).flip(-1).flatten(-2)
    z = unpack_int4_zeros(w_zero_packed)
    if convention.zeros_high_first:
        z = z.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    zf = (z.float() + convention.zero_offset).repeat_interleave(INT2_GROUP, dim=-1)
    return (q.float() - zf) * w_scale.float().repeat_interleave(INT2_GROUP, dim=-1)


def relative_error(approx: torch.Tensor, reference: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| (inf for a zero reference)."""
    norm = reference.float().norm()
    return float((approx.float() - reference.float()).norm() / norm) if norm > 0 else float("inf")


# -- GGML block formats (ds4's GGUF), see the module docstring --------------------------------

# format -> (values per block, bytes per block); the GGUF format's own numbers
# (gguf.GGML_QUANT_SIZES, checked in the tests).
GGML_BLOCKS = {
    WeightFormat.Q8_0: (32, 34),
    WeightFormat.Q2_K: (256, 84),
    WeightFormat.IQ2_XXS: (256, 66),
}
Q2_K_SUB = 16      # Q2_K: one 4-bit scale and min per 16 values
IQ2_SUB = 32       # IQ2_XXS: one 4-bit scale per 32 values (4 groups of 8)
IQ2_GRID_MAX = 43  # largest magnitude in the IQ2_XXS grid (its values are 8, 25, 43)


def ggml_row_bytes(fmt: WeightFormat, in_features: int) -> int:
    """Bytes of one row of `in_features` values in block format `fmt`."""
    values, size = GGML_BLOCKS[fmt]
    if in_features % values:
        raise ValueError(f"{fmt.value} needs in_features divisible by {values}, got {in_features}")
    return in_features // values * size


def _blocks(packed: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """uint8 [..., n * S] -> [..., n, S]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"{fmt.value} blocks must be uint8, got {packed.dtype}")
    size = GGML_BLOCKS[fmt][1]
    if packed.shape[-1] % size:
        raise ValueError(f"{fmt.value} rows must be whole {size}-byte blocks, got {packed.shape[-1]} bytes")
    return packed.unflatten(-1, (-1, size))


def _f16(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Little-endian f16 from its two bytes (any strides) -> float32."""
    bits = lo.to(torch.int32) | (hi.to(torch.int32) << 8)
    bits = torch.where(bits >= 2**15, bits - 2**16, bits)  # the same 16 bits as int16
    return bits.to(torch.int16).view(torch.float16).float()


def _u32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian 32-bit words from [..., 4] bytes -> int64 [...]."""
    b = b.to(torch.int64)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] already rounded to f16 -> uint8 [..., 2] little endian."""
    return x.to(torch.float16).contiguous().view(torch.int16).unsqueeze(-1).view(torch.uint8)


def dequantize_q8_0(packed: torch.Tensor) -> torch.Tensor:
    """Q8_0 uint8 [..., in/32 * 34] -> float32 [..., in]: w = d * q."""
    b = _blocks(packed, WeightFormat.Q8_0)
    d = _f16(b[..., 0], b[..., 1])  # [..., n]
    q = b[..., 2:].view(torch.int8).float()  # [..., n, 32]
    return (q * d.unsqueeze(-1)).flatten(-2)


def dequantize_q2_k(packed: torch.Tensor) -> torch.Tensor:
    """Q2_K uint8 [..., in/256 * 84] -> float32 [..., in]: w = d*scale*q - dmin*min.

    Code order: byte j of the 32-byte half h holds values h*128 + 32*s + j at bits 2s..2s+1.
    """
    b = _blocks(packed, WeightFormat.Q2_K)
    scales, qs = b[..., :16], b[..., 16:80]
    d, dmin = _f16(b[..., 80], b[..., 81]), _f16(b[..., 82], b[..., 83])  # [..., n]
    dl = d.unsqueeze(-1) * (scales & 0xF).float()  # [..., n, 16]
    ml = dmin.unsqueeze(-1) * (scales >> 4).float()
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1)
    q = (qs.unflatten(-1, (2, 1, 32)) >> shifts) & 3  # [..., n, 2, 4, 32]
    q = q.flatten(-3).unflatten(-1, (16, Q2_K_SUB)).float()  # [..., n, 16, 16]
    return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).flatten(-3)


@functools.cache
def _iq2_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS grid float32 [256, 8] and sign bytes uint8 [128], from the gguf package."""
    import numpy as np
    from gguf.quants import IQ2_XXS

    IQ2_XXS.init_grid()
    grid = torch.from_numpy(np.array(IQ2_XXS.grid, dtype=np.float32).reshape(256, 8))
    signs = torch.from_numpy(np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8).copy())
    return grid.to(device), signs.to(device)


def dequantize_iq2_xxs(packed: torch.Tensor) -> torch.Tensor:
    """IQ2_XXS uint8 [..., in/256 * 66] -> float32 [..., in]."""
    b = _blocks(packed, WeightFormat.IQ2_XXS)
    grid, ksigns = _iq2_tables(str(packed.device))
    d = _f16(b[..., 0], b[..., 1])  # [..., n]
    qs = b[..., 2:].unflatten(-1, (8, 8))  # [..., n, 8 sub-blocks, 8 bytes]
    aux1 = _u32(qs[..., 4:])  # [..., n, 8]: 4 x 7 sign bits, scale in bits 28..31
    db = d.unsqueeze(-1) * (0.5 + (aux1 >> 28).float()) * 0.25  # [..., n, 8]
    k = torch.arange(4, device=packed.device)
    sign_idx = (aux1.unsqueeze(-1) >> (7 * k)) & 0x7F  # [..., n, 8, 4]
    bits = torch.arange(8, device=packed.device, dtype=torch.uint8)
    neg = (ksigns[sign_idx].unsqueeze(-1) >> bits) & 1  # [..., n, 8, 4, 8]
    signs = torch.where(neg == 0, 1.0, -1.0)
    g = grid[qs[..., :4].long()]  # [..., n, 8, 4, 8]
    return (db[..., None, None] * g * signs).flatten(-4)


_GGML_DEQUANT = {WeightFormat.Q8_0: dequantize_q8_0, WeightFormat.Q2_K: dequantize_q2_k,
                 WeightFormat.IQ2_XXS: dequantize_iq2_xxs}


def dequantize_ggml(fmt: WeightFormat, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """GGML blocks uint8 [..., in/B * S] -> dense [..., in] of `dtype` (through float32)."""
    return _GGML_DEQUANT[fmt](packed).to(dtype)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float [..., in] -> Q8_0 uint8 [..., in/32 * 34] by the gguf package's quantiser
    (ggml's reference rounding, bit for bit)."""
    from gguf import GGMLQuantizationType, quants

    ggml_row_bytes(WeightFormat.Q8_0, w.shape[-1])
    out = quants.quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(out).to(w.device)


def quantize_q2_k(w: torch.Tensor) -> torch.Tensor:
    """float [..., in] -> Q2_K uint8 [..., in/256 * 84], min/max per 16 values (the gguf
    package has no Q2_K quantiser; this writes the blocks from the format's definition).

    Each 16-value group gets w ~ dl * q - ml with q in 0..3, its range widened to hold 0 so
    ml >= 0; dl and ml are then 4-bit multiples of the block's f16 `d` and `dmin`.
    """
    ggml_row_bytes(WeightFormat.Q2_K, w.shape[-1])
    x = w.float().unflatten(-1, (-1, 16, Q2_K_SUB))  # [..., n, 16, 16]
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1).clamp(min=0)
    want_dl, want_ml = (hi - lo) / 3, -lo  # [..., n, 16]
    d = (want_dl.amax(-1) / 15).to(torch.float16).float()  # [..., n]
    dmin = (want_ml.amax(-1) / 15).to(torch.float16).float()
    sc = torch.round(want_dl / d.clamp(min=2**-24).unsqueeze(-1)).clamp(0, 15)
    mn = torch.round(want_ml / dmin.clamp(min=2**-24).unsqueeze(-1)).clamp(0, 15)
    dl = (d.unsqueeze(-1) * sc).unsqueeze(-1)
    ml = (dmin.unsqueeze(-1) * mn).unsqueeze(-1)
    q = torch.round((x + ml) / dl.clamp(min=2**-30)).clamp(0, 3).to(torch.uint8)  # [..., n, 16, 16]
    q = q.flatten(-2).unflatten(-1, (2, 4, 32))  # value h*128 + 32*s + j
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    scales = sc.to(torch.uint8) | (mn.to(torch.uint8) << 4)
    block = torch.cat([scales, qs.flatten(-2), _f16_bytes(d), _f16_bytes(dmin)], dim=-1)
    return block.flatten(-2)


def quantize_iq2_xxs(w: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """float [..., in] -> IQ2_XXS uint8 [..., in/256 * 66], nearest grid row per 8 values
    (the gguf package has no IQ2_XXS quantiser; blocks are written from the definition).

    Signs are the values' own, except that an odd number of negatives in a group of 8 (the
    format stores 7 signs and the parity) flips the sign of the group's smallest value.
    """
    ggml_row_bytes(WeightFormat.IQ2_XXS, w.shape[-1])
    grid, _ = _iq2_tables(str(w.device))
    x = w.float().unflatten(-1, (-1, 8, IQ2_SUB))  # [..., n, 8, 32]
    target = x.abs().amax(-1) / IQ2_GRID_MAX  # the step that maps a sub-block's max to 43
    d = (target.amax(-1) / (15.5 * 0.25)).to(torch.float16).float()  # [..., n]
    sc = torch.round(target / (d.clamp(min=2**-24).unsqueeze(-1) * 0.25) - 0.5).clamp(0, 15)
    step = d.unsqueeze(-1) * (0.5 + sc) * 0.25  # [..., n, 8]
    groups = x.unflatten(-1, (4, 8))  # [..., n, 8, 4, 8]
    mag = (groups.abs() / step.clamp(min=2**-30)[..., None, None]).reshape(-1, 8)
    idx = torch.empty(mag.shape[0], dtype=torch.int64, device=w.device)
    norms = grid.square().sum(-1)
    for lo in range(0, mag.shape[0], chunk):  # bounded [chunk, 256] distance matrix
        m = mag[lo : lo + chunk]
        idx[lo : lo + chunk] = (norms - 2 * m @ grid.T).argmin(-1)
    idx = idx.view(groups.shape[:-1])
    neg = groups < 0
    odd = neg.sum(-1) % 2 == 1
    smallest = torch.nn.functional.one_hot(groups.abs().argmin(-1), 8).bool()
    neg = neg ^ (smallest & odd.unsqueeze(-1))
    weights7 = 2 ** torch.arange(7, device=w.device)
    sign_idx = (neg[..., :7].long() * weights7).sum(-1)  # [..., n, 8, 4]
    aux1 = (sign_idx << (7 * torch.arange(4, device=w.device))).sum(-1) | (sc.long() << 28)
    shifts = torch.arange(0, 32, 8, device=w.device)
    aux1_bytes = ((aux1.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)  # [..., n, 8, 4]
    sub = torch.cat([idx.to(torch.uint8), aux1_bytes], dim=-1).flatten(-2)  # [..., n, 64]
    return torch.cat([_f16_bytes(d), sub], dim=-1).flatten(-2)


_GGML_QUANT = {WeightFormat.Q8_0: quantize_q8_0, WeightFormat.Q2_K: quantize_q2_k,
               WeightFormat.IQ2_XXS: quantize_iq2_xxs}


def quantize_ggml(fmt: WeightFormat, w: torch.Tensor) -> torch.Tensor:
    """float [..., in] -> GGML blocks uint8 [..., in/B * S] of `fmt`."""
    return _GGML_QUANT[fmt](w)
