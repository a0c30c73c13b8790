"""A verbose allclose for kernel tests: on failure it names the worst and first mismatches."""

from __future__ import annotations

import torch


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    name: str = "output",
    show: int = 8,
) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.float(), expected.float()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:show].tolist()
        raise AssertionError(f"{name}: non-finite values (unwritten or poisoned) at {bad}")
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:show].tolist()
        rows = [
            f"  {tuple(i)}: got {a[tuple(i)].item():.6g}, want {e[tuple(i)].item():.6g}"
            for i in idx
        ]
        worst = err.argmax()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements outside atol={atol} "
            f"rtol={rtol}; max abs error {err.max().item():.3g} at flat index {int(worst)}\n"
            + "\n".join(rows)
        )
