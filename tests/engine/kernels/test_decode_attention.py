"""decode_attention (Triton) vs its PyTorch reference, and the reference vs engine/attention.py.

On the CPU the kernels run under TRITON_INTERPRET=1 at tiny shapes (Hh 4, D 64, W 8, 13
entries, Kc 5); with CUDA the same tests run at V4-Flash's shapes (Hh 64, D 512, W 128,
8192 / 256 entries, Kc 512). Ring slots that hold no position yet and every buffer the
launcher allocates are poisoned, so a key read from the wrong place or an output left
unwritten fails the comparison. Every slot's last entry is NaN and never visible: an index
-1 read as an address lands on the previous slot's last entry.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.attention import Attention
from engine.kernels import decode_attention as da
from engine.kernels import mode
from tests.engine.kernels._allclose import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:  # V4-Flash: 64 heads x 512, ring 128, ratio-4 entries at 32K, indexer top-512
    HEADS, DIM, RING, SPARSE_N, TOPK, DENSE_N, ROWS = 64, 512, 128, 8192, 512, 256, 32
else:
    HEADS, DIM, RING, SPARSE_N, TOPK, DENSE_N, ROWS = 4, 64, 8, 13, 5, 13, 3
POISON = float("nan")  # ring slots and entries no position owns: any read of one shows


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output/partial buffer starts as NaN: an element the kernels skip shows up."""
    monkeypatch.setattr(
        da,
        "_empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def make_case(batch: int, kind: str, dtype: torch.dtype, seed: int, positions=None):
    """Random inputs of one decode step: kind "window" (ratio 0), "sparse" (ratio 4, indexer
    picks with -1 padding) or "dense" (ratio 128, arange with -1 past the visible count)."""
    g = torch.Generator().manual_seed(seed)
    pool = batch + 2
    slots = torch.randperm(pool, generator=g)[:batch]
    ratio = {"window": 0, "sparse": 4, "dense": 128}[kind]
    n_entries = {"window": 0, "sparse": SPARSE_N, "dense": DENSE_N}[kind]
    if positions is None:
        top = n_entries * ratio if ratio else 4 * RING
        positions = torch.randint(0, top, (batch,), generator=g)
        positions[0] = RING // 2 - 1  # always one row whose ring is not full yet
    positions = torch.as_tensor(positions, dtype=torch.int64)
    q = torch.randn(batch, HEADS, DIM, generator=g)
    window = torch.randn(pool, RING, DIM, generator=g)
    for b in range(batch):
        p = int(positions[b])
        if p < RING - 1:
            window[slots[b], p + 1 :] = POISON
    entries = entry_idx = None
    if kind != "window":
        entries = torch.randn(pool, n_entries, DIM, generator=g)
        visible = ((positions + 1) // ratio).clamp(max=n_entries)
        entries[:, n_entries - 1] = POISON  # never visible: the position cap keeps it out
        visible = visible.clamp(max=n_entries - 1)
        if kind == "sparse":
            entry_idx = torch.full((batch, TOPK), -1, dtype=torch.int64)
            for b in range(batch):
                chosen = torch.randperm(int(visible[b]), generator=g)[:TOPK]
                entry_idx[b, torch.randperm(TOPK, generator=g)[: len(chosen)]] = chosen
        else:
            ar = torch.arange(n_entries)
            entry_idx = torch.where(ar < visible.unsqueeze(-1), ar, -1)
    sink = torch.randn(HEADS, generator=g)
    to = dict(device=DEVICE)
    return dict(
        q=q.to(dtype=dtype, **to),
        window=window.to(dtype=dtype, **to),
        entries=None if entries is None else entries.to(dtype=dtype, **to),
        slots=slots.to(**to),
        positions=positions.to(**to),
        entry_idx=None if entry_idx is None else entry_idx.to(**to),
        sink=sink.to(**to),
        softmax_scale=DIM**-0.5,
    )


# bf16 inputs: q.k products are exact in fp32 and the softmax is fp32 in both paths; the kernel
# rounds the probabilities to bf16 for the p @ v tensor-core dot (FlashAttention does the
# same), a relative 2^-9 on each weight, so |error| <= 2^-9 * max|v| (~4 for normal keys:
# 0.008) plus the output's own bf16 rounding (2^-9 relative). atol 1.5e-2 covers that bound;
# a wrongly masked or misplaced key moves outputs by O(0.1..1e3).
BF16_TOL = dict(atol=1.5e-2, rtol=1e-2)
# fp32 inputs use exact fp32 dots: only the summation order and exp2 vs exp differ (~1e-6).
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["window", "sparse", "dense"])
@pytest.mark.parametrize("batch", [1, ROWS])
def test_matches_reference(kind: str, batch: int) -> None:
    for seed in range(2):  # fresh random inputs per check
        case = make_case(batch, kind, torch.bfloat16, seed=100 * batch + seed)
        want = da.decode_attention_reference(**case)
        with mode("triton"):
            got = da.decode_attention(**case)
        assert_close(got, want, name=f"{kind} B={batch}", **BF16_TOL)


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_key_splits_agree(num_splits: int) -> None:
    """Forced split counts (tiny key tiles on the CPU) take the partial + combine path with
    splits whose keys are all masked (ring slots past p, -1 entries)."""
    block_n = 16 if CUDA else 4
    case = make_case(
        ROWS,
        "sparse",
        torch.float32,
        seed=7 + num_splits,
        positions=None if CUDA else [2, RING - 1, 33],
    )
    want = da.decode_attention_reference(**case)
    got = da.launch(**case, block_n=block_n, num_splits=num_splits)
    assert_close(got, want, name=f"splits={num_splits}", **FP32_TOL)


def rope_case(case: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, R/2] of random query positions (R = 64 real, 16 on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(case["q"].shape[0], (64 if CUDA else 16) // 2, generator=g) * 100
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_inverse_rope(num_splits: int, dtype: torch.dtype) -> None:
    """rope=(cos, sin): the writing kernel (the main one with one split, the combine kernel
    otherwise) turns the output back: the reference chain (attention, then apply_rope(inverse)
    of its rounded output), and the same kernel's unfused output rotated by the reference
    rope to within one output rounding (bf16: an fp32 ulp of a contracted multiply-add can
    flip it; fp32: a few ulps)."""
    case = make_case(ROWS, "sparse", dtype, seed=21 + num_splits,
                     positions=None if CUDA else [2, RING - 1, 33])
    cos, sin = rope_case(case, seed=5)
    want = da.decode_attention_reference(**case)
    want = da.rope_reference(want, cos, sin, inverse=True)
    block_n = 16 if CUDA else 4
    got = da.launch(**case, block_n=block_n, num_splits=num_splits, rope=(cos, sin))
    plain = da.launch(**case, block_n=block_n, num_splits=num_splits)
    assert_close(got, want, name=f"fused rope, {num_splits} splits",
                 **(BF16_TOL if dtype == torch.bfloat16 else FP32_TOL))
    turned = da.rope_reference(plain, cos, sin, inverse=True)
    if dtype == torch.bfloat16:
        assert_close(got, turned, name="vs unfused", atol=2**-20, rtol=2**-7)
        differ = (got != turned).float().mean().item()
        assert differ < 0.01, f"{differ:.2%} of elements differ from the unfused rotation"
    else:
        assert_close(got, turned, name="vs unfused", atol=1e-6, rtol=1e-6)
    with mode("reference"):
        assert torch.equal(da.decode_attention(**case, rope=(cos, sin)), want)


def test_positions_around_window_edge() -> None:
    """p = 0 (one key), p = W-2 (ring one short), p = W-1 (full), p = W (wrapped once)."""
    positions = [0, RING - 2, RING - 1, RING]
    case = make_case(4, "window", torch.float32, seed=3, positions=positions)
    want = da.decode_attention_reference(**case)
    with mode("triton"):
        got = da.decode_attention(**case)
    assert_close(got, want, name="window edge", **FP32_TOL)


def test_all_entries_padding_is_window_only() -> None:
    """entry_idx all -1 gives exactly the window-only attention."""
    case = make_case(2, "sparse", torch.float32, seed=5)
    case["entry_idx"] = torch.full_like(case["entry_idx"], -1)
    with mode("triton"):
        got = da.decode_attention(**case)
        alone = da.decode_attention(**{**case, "entries": None, "entry_idx": None})
    assert_close(got, alone, name="all -1 vs none", **FP32_TOL)


def test_reference_matches_model_attend() -> None:
    """The reference equals engine/attention.py `_attend` run on the keys in position order
    (the model's view of the ring: positions max(0, p-W+1)..p at slot pos % W)."""
    case = make_case(ROWS, "sparse", torch.float32, seed=11)
    got = da.decode_attention_reference(**case)
    attn = SimpleNamespace(softmax_scale=case["softmax_scale"], attn_sink=case["sink"])
    for b in range(ROWS):
        p, slot = int(case["positions"][b]), int(case["slots"][b])
        ring_pos = torch.arange(max(0, p - RING + 1), p + 1, device=DEVICE)
        keys = case["window"][slot, ring_pos % RING]
        idx = case["entry_idx"][b]
        keys = torch.cat([keys, case["entries"][slot, idx[idx >= 0]]])
        allowed = torch.ones(1, keys.shape[0], dtype=torch.bool, device=DEVICE)
        want = Attention._attend(attn, case["q"][b : b + 1], keys, allowed)
        assert_close(got[b : b + 1], want, name=f"row {b}", atol=1e-6, rtol=1e-5)


def test_rejects_bad_inputs() -> None:
    case = make_case(2, "sparse", torch.float32, seed=1)
    with pytest.raises(ValueError, match="entries and entry_idx"):
        da.decode_attention(**{**case, "entry_idx": None})
    with pytest.raises(ValueError, match="positions must be int64"):
        da.decode_attention(**{**case, "positions": case["positions"].int()})
    with pytest.raises(ValueError, match="window dtype"):
        da.decode_attention(**{**case, "window": case["window"].half()})
    with pytest.raises(ValueError, match="sink must be float32"):
        da.decode_attention(**{**case, "sink": case["sink"][:-1]})
