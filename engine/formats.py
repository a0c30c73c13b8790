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

Dequantisation is exact: e4m3 and e2m1 values times a power of two fit bf16 and fp32
without rounding (3 and 1 mantissa bits against bf16's 7), so a round trip through the
packers returns the quantised values bit for bit.

The quantisers (`quantize_*`) exist for tests and `engine.make_checkpoint`; they are
round-to-nearest, not the release's own quantisation recipe.
"""

from __future__ import annotations

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
