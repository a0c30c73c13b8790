"""Triton kernels of the engine's fast path: one op per file, each with its launcher.

Every launcher takes the Triton kernel or the op's plain PyTorch reference through one
switch, `use_triton(tensor)`, never through scattered `if cuda:` checks:

  mode "auto"       (default) Triton on CUDA tensors, the reference elsewhere
  mode "triton"     Triton everywhere: CPU tensors need TRITON_INTERPRET=1 (the CI tests)
  mode "reference"  the reference everywhere (the oracle; `--engine-path reference`)

The mode is process-wide state set once by whoever builds the engine (the proxy's settings,
a test fixture); nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MODES = ("auto", "triton", "reference")
_mode = "auto"


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Run a block under another kernel mode (tests compare the two paths this way)."""
    old = _mode
    set_mode(name)
    try:
        yield
    finally:
        set_mode(old)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether a launcher given `t` (its main input) should take the Triton kernel."""
    if _mode == "reference":
        return False
    if _mode == "triton":
        return True
    return t.is_cuda and triton_available()
