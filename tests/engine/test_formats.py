"""Round trips and hand-checked bytes for every stored weight format (engine/formats.py)."""

from __future__ import annotations

import pytest
import torch

from engine import formats as fm

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _rand(*shape: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


# -- E8M0 ----------------------------------------------------------------------------------


def test_e8m0_is_a_pure_exponent():
    raw = torch.tensor([0, 120, 127, 128, 134, 254], dtype=torch.uint8)
    expected = torch.tensor([2.0**-127, 2.0**-7, 1.0, 2.0, 128.0, 2.0**127])
    assert torch.equal(fm.e8m0_to_float(raw), expected)
    assert torch.equal(fm.e8m0_to_float(raw.view(torch.float8_e8m0fnu)), expected)
    with pytest.raises(TypeError, match="float8_e8m0fnu or uint8"):
        fm.e8m0_to_float(raw.float())


def test_e8m0_for_picks_the_smallest_covering_power_of_two():
    amax = torch.tensor([448.0, 449.0, 1.0, 0.0])
    s = fm.e8m0_to_float(fm.e8m0_for(amax, fm.FP8_MAX))
    assert s[0] == 1.0 and s[1] == 2.0 and s[2] == 2.0**-8
    assert s[3] > 0  # an all-zero block still gets a finite scale


# -- FP8 -----------------------------------------------------------------------------------


def test_fp8_decoding_matches_the_formula_by_hand():
    # Two 128-row blocks x one 128-column block: scale bytes 126 (x0.5) and 130 (x8).
    w = torch.full((256, 128), 1.5).to(torch.float8_e4m3fn)
    scale = torch.tensor([[126], [130]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    dense = fm.dequantize_fp8(w, scale, torch.float32)
    assert torch.all(dense[:128] == 0.75) and torch.all(dense[128:] == 12.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (1, 7)])
def test_fp8_round_trip(shape, device):
    w = _rand(*shape, device=device) * 3
    q, scale = fm.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert tuple(scale.shape) == fm.fp8_scale_shape(*shape)
    dense = fm.dequantize_fp8(q, scale, torch.float32)
    # Re-quantising the dequantised weight returns the same bytes: decoding is exact.
    q2, scale2 = fm.quantize_fp8(dense)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(scale2.view(torch.uint8), scale.view(torch.uint8))
    # bf16 holds e4m3 x 2^k exactly (3 mantissa bits < 7).
    assert torch.equal(fm.dequantize_fp8(q, scale, torch.bfloat16).float(), dense)
    # e4m3 rounds to 3 mantissa bits: relative error <= 2^-4, plus the subnormal step
    # (2^-9 of the block scale) for values near zero.
    step = fm.e8m0_to_float(scale).repeat_interleave(128, 0).repeat_interleave(128, 1)
    step = step[: shape[0], : shape[1]]
    assert torch.all((dense - w).abs() <= w.abs() * 2**-4 + step * 2**-9)


# -- FP4 -----------------------------------------------------------------------------------


def test_fp4_packs_low_nibble_first_by_hand():
    # Row of 32 inputs: 0.5, -6, 3, 0, then zeros; amax 6 -> scale 2^0 (byte 127).
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([0.5, -6.0, 3.0, 0.0])
    packed, scale = fm.quantize_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16)
    assert scale.view(torch.uint8).tolist() == [[127]]
    # 0.5 = code 1 (low nibble), -6 = code 8|7 = 15 (high nibble) -> 0xF1.
    # 3 = code 5 (low), 0 = code 0 (high) -> 0x05.
    assert packed.view(torch.uint8)[0, :3].tolist() == [0xF1, 0x05, 0x00]
    assert fm.dequantize_fp4(packed, scale, torch.float32)[0, :4].tolist() == [0.5, -6.0, 3.0, 0.0]


def test_fp4_decodes_every_code():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).view(1, 32)
    packed = fm.pack_fp4(codes)
    assert torch.equal(fm.unpack_fp4(packed), codes)
    scale = torch.tensor([[128]], dtype=torch.uint8)  # x2
    values = fm.dequantize_fp4(packed, scale, torch.float32)[0, :16]
    expected = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6]) * 2
    assert torch.equal(values, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_fp4_round_trip_and_error_bound(device):
    w = _rand(64, 256, device=device)
    packed, scale = fm.quantize_fp4(w)
    assert packed.shape == (64, 128) and scale.shape == (64, 8)
    dense = fm.dequantize_fp4(packed, scale, torch.float32)
    # The quantised values are a fixed point (the bytes may differ: a group whose amax
    # rounded down can take a smaller scale the second time).
    assert torch.equal(fm.dequantize_fp4(*fm.quantize_fp4(dense), torch.float32), dense)
    assert torch.equal(fm.pack_fp4(fm.unpack_fp4(packed)), packed)
    assert torch.equal(fm.dequantize_fp4(packed, scale, torch.bfloat16).float(), dense)
    # The widest e2m1 gap is 2 (between 4 and 6): error <= 1 scale unit.
    unit = fm.e8m0_to_float(scale).repeat_interleave(32, dim=-1)
    assert torch.all((dense - w).abs() <= unit)


def test_fp4_rejects_odd_sizes():
    with pytest.raises(ValueError, match="divisible by 32"):
        fm.quantize_fp4(torch.zeros(2, 48))


# -- INT2-G64 ------------------------------------------------------------------------------


def test_int2_bit_layout_by_hand():
    # Value k of a word sits at bits 2k..2k+1: q = [1, 2, 3, 0, ...0, 3] -> 0xC0000039.
    q = torch.zeros(1, 16, dtype=torch.uint8)
    q[0, :3] = torch.tensor([1, 2, 3])
    q[0, 15] = 3
    packed = fm.pack_int2(q)
    assert packed.dtype == torch.uint32
    assert packed.view(torch.int32).item() == 0xC0000039 - 2**32
    assert torch.equal(fm.unpack_int2(packed), q)


def test_int4_zeros_low_nibble_first():
    z = torch.tensor([[3, 1, 0, 2]], dtype=torch.uint8)
    packed = fm.pack_int4_zeros(z)
    assert packed.view(torch.uint8).tolist() == [[0x13, 0x20]]
    assert torch.equal(fm.unpack_int4_zeros(packed), z)


def test_int2_dequantize_formula_by_hand():
    # One row of 128 inputs = 2 groups; (q - z) * s with q = 3, z = 1 / 2, s = 0.5 / 2.
    packed = fm.pack_int2(torch.full((1, 128), 3))
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    zeros = fm.pack_int4_zeros(torch.tensor([[1, 2]]))
    dense = fm.dequantize_int2(packed, scale, zeros, torch.float32)
    assert torch.all(dense[0, :64] == 1.0) and torch.all(dense[0, 64:] == 2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_int2_round_trip_with_expert_dim(device):
    w = _rand(3, 8, 256, device=device)  # [E, out, in]
    packed, scale, zeros = fm.quantize_int2(w)
    assert packed.shape == (3, 8, 16) and scale.shape == (3, 8, 4) and zeros.shape == (3, 8, 2)
    assert (packed.dtype, scale.dtype, zeros.dtype) == (torch.uint32, torch.float16, torch.int8)
    dense = fm.dequantize_int2(packed, scale, zeros, torch.float32)
    # Every weight is within half a step of its group's grid (the range includes 0).
    step = scale.float().repeat_interleave(64, dim=-1)
    assert torch.all((dense - w).abs() <= step * 0.5 * (1 + 1e-3))
    # Unpacking then repacking gives the same bytes.
    assert torch.equal(fm.pack_int2(fm.unpack_int2(packed)).view(torch.int32), packed.view(torch.int32))
    assert torch.equal(fm.pack_int4_zeros(fm.unpack_int4_zeros(zeros)), zeros)
    assert fm.int2_shapes(8, 256) == ((8, 16), (8, 4), (8, 2))
