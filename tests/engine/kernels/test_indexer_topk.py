"""indexer_topk (Triton radix select) vs the reference's stable descending sort.

The kernel returns the chosen set in ascending index order, the reference best first, so
they are compared as sets (and the kernel's order checked ascending). Scores are drawn from
a few values so exact ties, including at the k-th place, are common; -0.0 and +0.0 must tie;
-inf marks entries not visible. CPU: TRITON_INTERPRET=1 at N 13 / 70, k 5; CUDA: N 8192,
k 512.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import indexer_topk as it
from engine.kernels import mode

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = [(8192, 512), (300, 512)] if CUDA else [(13, 5), (70, 5), (4, 5)]  # (N, k)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs start as a value no slot may keep: neither -1 nor an entry index."""
    monkeypatch.setattr(
        it, "_empty", lambda shape, dtype, device: torch.full(shape, -7, dtype=dtype, device=device)
    )


def make_scores(batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (batch, n), generator=g).float() * 0.5  # many exact ties
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5,
                                      -0.0, 0.0)  # fmt: skip
    visible = torch.randint(0, n + 1, (batch, 1), generator=g)
    visible[0] = n  # one row fully visible
    if batch > 1:
        visible[1] = 1  # one row with a single visible entry
    scores[torch.arange(n) >= visible] = float("-inf")
    return scores.to(DEVICE)


def as_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(idx.shape[0], n + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, torch.where(idx < 0, n, idx), True)
    return mask[:, :n]


@pytest.mark.parametrize(("n", "k"), SIZES)
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_stable_sort(n: int, k: int, batch: int) -> None:
    for seed in range(3):
        scores = make_scores(batch, n, seed=100 * n + seed)
        want = it.indexer_topk_reference(scores, k)
        with mode("triton"):
            got = it.indexer_topk(scores, k)
        assert got.shape == want.shape
        assert torch.equal(as_mask(got, n), as_mask(want, n)), (scores, got, want)
        assert torch.equal((got < 0).sum(-1), (want < 0).sum(-1)), "-1 padding count"
        valid = got >= 0
        assert (valid[:, :-1] >= valid[:, 1:]).all(), "-1 only after the chosen entries"
        assert ((got.diff(dim=-1) > 0) | ~valid[:, 1:]).all(), "chosen entries ascending"


def test_signed_zeros_tie() -> None:
    """All-ReLU-zero rows (common: every head's relu is 0) give +0.0 or -0.0 scores; they tie,
    so the first k entries win whatever their signs."""
    n, k = SIZES[0]
    g = torch.Generator().manual_seed(2)
    scores = torch.where(torch.rand(2, n, generator=g) < 0.5, -0.0, 0.0).to(DEVICE)
    with mode("triton"):
        got = it.indexer_topk(scores, k)
    assert torch.equal(got, torch.arange(k, device=DEVICE).expand(2, k))


def test_distinct_scores_pick_the_largest() -> None:
    """Without ties: the chosen entries are exactly the k largest."""
    n, k = SIZES[0]
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, n, generator=g).to(DEVICE)
    with mode("triton"):
        got = it.indexer_topk(scores, k)
    want = scores.topk(k, dim=-1).indices
    assert torch.equal(as_mask(got, n), as_mask(want, n))


def test_reference_fallback_keeps_the_kernels_order() -> None:
    scores = make_scores(4, SIZES[0][0], seed=5)
    with mode("reference"):
        ref = it.indexer_topk(scores, SIZES[0][1])
    with mode("triton"):
        fast = it.indexer_topk(scores, SIZES[0][1])
    assert torch.equal(ref, fast)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="float32"):
        it.indexer_topk(torch.zeros(2, 3, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="positive"):
        it.indexer_topk(torch.zeros(2, 3), 0)
