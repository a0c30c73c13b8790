"""Optional Triton import and a lazily compiled `jit` for the kernel files.

The base install has no Triton, so the kernel files import it through here and only the
Triton path needs it. `jit` wraps a kernel without calling `triton.jit` until its first
launch: `triton.jit` decides between the compiler and the CPU interpreter (TRITON_INTERPRET)
when it runs, and the engine's modules are imported before a test's conftest can set it.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs neither
    triton = tl = None


class jit:
    def __init__(self, fn) -> None:
        self.fn = fn
        self._kernel = None

    def __getitem__(self, grid):
        if self._kernel is None:
            if triton is None:
                raise RuntimeError("the Triton path needs the `triton` package (the test extra)")
            self._kernel = triton.jit(self.fn)
        return self._kernel[grid]
