"""Compressor ring update + pooling kernel (engine/kernels/compress_pool.py) against its
PyTorch reference: the same entries and the same rings after the write.

Tolerance: both compute exp(s - max) per channel in fp32 and add P <= 256 products; the
kernel divides once at the end (sum(kv e) / sum(e)) where torch normalises first, so entries
differ by a few fp32 ulps of max |kv|: 1e-5 relative to max |kv| catches any wrong row or
channel (those move entries by O(|kv|)). The rings are written, not computed: exact.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import mode
from engine.kernels.compress_pool import compress_pool, compress_pool_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (ratio, overlap, d): the real ones on the GPU (attention r=128 and r=4 with d=512, the
# indexer's r=4 with d=128); small odd channel counts on the CPU leave partial blocks
CASES = ([(128, False, 512), (4, True, 512), (4, True, 128)] if CUDA
         else [(8, False, 20), (4, True, 24), (4, True, 7)])
S = 5  # slots


def _inputs(ratio: int, overlap: bool, d: int, positions: list[int], seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    C, W = (2 * d, 2 * ratio) if overlap else (d, ratio)
    B = len(positions)
    kv = torch.randn(B, 2 * C, generator=g, device=DEVICE)[:, :C]  # a split's strided view
    score = torch.randn(B, C, generator=g, device=DEVICE) * 3
    ape = torch.randn(ratio, C, generator=g, device=DEVICE)
    ring_kv = torch.randn(S, W, C, generator=g, device=DEVICE)
    ring_score = torch.randn(S, W, C, generator=g, device=DEVICE) * 3
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(seed))[:B].to(DEVICE)
    return kv, score, ape, ring_kv, ring_score, slots, torch.tensor(positions, device=DEVICE)


@pytest.mark.parametrize(("ratio", "overlap", "d"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_entries_and_rings_match_the_reference(ratio, overlap, d, seed):
    # entry 0 (its missing block), the first and last row of a block, a block boundary,
    # both halves of an overlapping ring (even and odd j), a far position
    positions = [0, ratio - 1, ratio, 2 * ratio + 1, 7 * ratio - 1][: S - (seed % 2)]
    kv, score, ape, ring_kv, ring_score, slots, pos = _inputs(ratio, overlap, d, positions, seed)
    ref_kv, ref_sc = ring_kv.clone(), ring_score.clone()
    want = compress_pool_reference(kv, score, ape, ref_kv, ref_sc, slots, pos, ratio, overlap)
    with mode("triton"):
        got = compress_pool(kv, score, ape, ring_kv, ring_score, slots, pos, ratio, overlap)
    assert torch.equal(ring_kv, ref_kv) and torch.equal(ring_score, ref_sc)
    assert got.shape == want.shape == (len(positions), d) and torch.isfinite(got).all()
    err = (got - want).abs().max()
    assert err <= 1e-5 * kv.abs().max(), f"max error {err}"


def test_an_entry_pools_its_rows_with_softmax_weights():
    """The reference itself, by hand for one channel of a non-overlapping ring: the pooled
    value is the softmax(score)-weighted mean of the ratio rows, the token's row included."""
    ratio, d = 4, 3
    kv, score, ape, ring_kv, ring_score, slots, pos = _inputs(ratio, False, d, [6], seed=3)
    before_kv, before_sc = ring_kv[slots[0]].clone(), ring_score[slots[0]].clone()
    with mode("triton"):
        got = compress_pool(kv, score, ape, ring_kv, ring_score, slots, pos, ratio, False)
    before_kv[6 % ratio] = kv[0]
    before_sc[6 % ratio] = score[0] + ape[6 % ratio]
    w = torch.softmax(before_sc[:, 1], dim=0)
    assert torch.allclose(got[0, 1], (w * before_kv[:, 1]).sum(), rtol=1e-5, atol=1e-6)


def test_rejects_rings_of_another_ratio():
    kv, score, _ape, ring_kv, ring_score, slots, pos = _inputs(4, False, 8, [1], seed=0)
    with mode("triton"), pytest.raises(ValueError, match="ratio 8"):
        compress_pool(kv, score, torch.zeros(8, 8, device=DEVICE), ring_kv, ring_score, slots,
                      pos, 8, False)
