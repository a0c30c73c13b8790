"""Shared fixtures of the kernel tests.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET
is set here, before any kernel is jitted (the kernel modules jit at their first launch, so it
does not matter that tests/engine/conftest.py imported the engine first). With CUDA the same
tests run compiled, at the real V4-Flash shapes.

Kernel helpers may append fixtures at the end of this file.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.kernels import mode

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def triton_mode():
    """Run the test with every launcher forced onto its Triton kernel."""
    with mode("triton"):
        yield


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors (ints: -1), so that any output
    element a kernel forgets to write shows up in the comparison instead of passing as
    whatever memory held."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.dtype.itemsize > 1:
            t.fill_(float("nan"))
        elif not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return empty


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float,
                         what: str = "") -> None:
    """|actual - expected| <= tol elementwise (tol a tensor broadcastable to the shape, or a
    float); on failure list the worst mismatching indices. NaN never passes."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = ~(err <= torch.as_tensor(tol, dtype=torch.float64, device=err.device))
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        rows = [f"  {tuple(i)}: got {a[tuple(i)].item():.6g}, want {e[tuple(i)].item():.6g}"
                for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements mismatch, "
                             f"max err {err.nan_to_num(float('inf')).max().item():.3g}\n"
                             + "\n".join(rows))
