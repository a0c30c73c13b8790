"""indexer_scores (Triton) vs its reference, and the reference vs Indexer.select_row's scores.

CPU: TRITON_INTERPRET=1 at Hi 4, Di 64, 13 entries per slot (two entry blocks need more: the
CPU kernel block is the real 64, so N 70 covers a partly visible second block). CUDA: Hi 64,
Di 128, 8192 entries (ratio 4 at 32K). Keys no position owns yet are NaN: reading one fails.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import fp4_roundtrip
from engine.kernels import indexer_scores as ix
from engine.kernels import mode
from tests.engine.kernels._allclose import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HEADS, DIM, ENTRIES, ROWS = (64, 128, 8192, 32) if CUDA else (4, 64, 70, 3)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        ix,
        "_empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def make_case(batch: int, dtype: torch.dtype, seed: int, positions=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    pool = batch + 2
    slots = torch.randperm(pool, generator=g)[:batch]
    if positions is None:
        positions = torch.randint(0, 4 * ENTRIES, (batch,), generator=g)
        positions[0] = 4 * 3 + 2  # three entries visible: most blocks skipped
    positions = torch.as_tensor(positions, dtype=torch.int64)
    q = torch.randn(batch, HEADS, DIM, generator=g)
    keys = torch.randn(pool, ENTRIES, DIM, generator=g)
    if dtype == torch.bfloat16:  # QAT: FP4 grid values, exact in bf16 (the released model)
        q, keys = fp4_roundtrip(q), fp4_roundtrip(keys)
    for b in range(batch):
        keys[slots[b], int(positions[b] + 1) // 4 :] = float("nan")
    weights = torch.randn(batch, HEADS, generator=g) * (DIM**-0.5 * HEADS**-0.5)
    return dict(
        q=q.to(DEVICE),  # fp32, as Indexer.queries returns it
        keys=keys.to(DEVICE, dtype),
        slots=slots.to(DEVICE),
        positions=positions.to(DEVICE),
        weights=weights.to(DEVICE),
    )


# bf16 keys with FP4-exact q: exact products, only the fp32 summation order (Di terms, then
# Hi) differs: ~1e-6 of the score's scale. fp32 keys: exact fp32 dots, the same.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, ROWS])
def test_matches_reference(batch: int, dtype: torch.dtype) -> None:
    for seed in range(2):
        case = make_case(batch, dtype, seed=10 * batch + seed)
        want = ix.indexer_scores_reference(**case)
        with mode("triton"):
            got = ix.indexer_scores(**case)
        visible = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), visible), "-inf exactly past the visible count"
        assert_close(got[visible], want[visible], name="scores", **TOL)


def test_bf16_weights_with_the_scale_are_the_decode_steps_cast_and_multiply() -> None:
    """weights_proj's bf16 output and the constant go in as they are: the same scores as the
    fp32 weights the step computed before (w.float() * scale, the same fp32 product)."""
    case = make_case(ROWS, torch.bfloat16, seed=6)
    scale = DIM**-0.5 * HEADS**-0.5
    raw = (case["weights"] / scale).to(torch.bfloat16)
    want = ix.indexer_scores_reference(**{**case, "weights": raw.float() * scale})
    with mode("triton"):
        got = ix.indexer_scores(**{**case, "weights": raw}, weight_scale=scale)
    visible = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), visible)
    assert_close(got[visible], want[visible], name="scaled bf16 weights", **TOL)
    assert torch.equal(ix.indexer_scores_reference(**{**case, "weights": raw}, weight_scale=scale),
                       want)


def test_nothing_visible_yet() -> None:
    case = make_case(2, torch.float32, seed=3, positions=[0, 2])  # (p + 1) // 4 == 0
    with mode("triton"):
        got = ix.indexer_scores(**case)
    assert torch.equal(got, torch.full_like(got, float("-inf")))


def test_reference_matches_select_row_formula() -> None:
    """Row by row, the formula of Indexer.select_row (one query, its slot's keys)."""
    case = make_case(ROWS, torch.float32, seed=4)
    got = ix.indexer_scores_reference(**case)
    for b in range(ROWS):
        n = int(case["positions"][b] + 1) // 4
        keys = case["keys"][case["slots"][b], :n]
        q, w = case["q"][b : b + 1], case["weights"][b : b + 1]
        want = (torch.einsum("nhd,td->nht", q, keys).relu() * w.unsqueeze(-1)).sum(dim=1)[0]
        assert_close(got[b, :n], want, name=f"row {b}", atol=1e-6, rtol=1e-6)
        assert torch.isinf(got[b, n:]).all()


def test_rejects_bad_inputs() -> None:
    case = make_case(2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="weights must be floating"):
        ix.indexer_scores(**{**case, "weights": case["weights"][:, :-1]})
    with pytest.raises(ValueError, match="slots must be int64"):
        ix.indexer_scores(**{**case, "slots": case["slots"].int()})
    with pytest.raises(ValueError, match="q must be float32 or the keys"):
        ix.indexer_scores(**{**case, "q": case["q"].half()})
