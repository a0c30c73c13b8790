"""Triton, imported at a kernel's first launch, for the kernel files.

Nothing here imports Triton when the engine is imported: the base install has none, and
Triton fixes compiler vs CPU interpreter (TRITON_INTERPRET) when it is first imported and
when each `triton.jit` runs, while the engine's modules are imported before a test's
conftest can set it. So a kernel file decorates its kernels with `jit` below, names
`tl = None` at module level (bound to triton.language at the first launch), and sizes its
grids with the pure-Python `cdiv` / `next_power_of_2`.
"""

from __future__ import annotations


def _import_triton():
    try:
        import triton
    except ImportError as e:
        raise RuntimeError("the Triton path needs `triton` (the test extra)") from e
    return triton


def helper(fn):
    """Mark a device function that kernels of several files call (engine/kernels/
    _device_math.py): `jit` and `LazyModule` jit it with the first kernel whose module
    names it, and bind its own module's `tl` and helpers too."""
    fn._triton_helper = True
    return fn


_jitted_helpers: dict = {}


def _bind(module_globals: dict, triton) -> None:
    """A module's `tl`, and each helper it names replaced by the helper's one jitted copy
    (kernels find the functions they call among their module's globals)."""
    module_globals["tl"] = triton.language
    for name, value in list(module_globals.items()):
        if getattr(value, "_triton_helper", False):
            module_globals[name] = _jit_helper(value, triton)


def jitted_helper(fn):
    """A helper's one jitted copy, for a kernel file that jits its kernels with triton.jit
    at import (its kernels then find the returned function among their globals)."""
    if any(fn is jitted for jitted in _jitted_helpers.values()):
        return fn  # a kernel's first launch bound the helper's module already
    return _jit_helper(fn, _import_triton())


def _jit_helper(fn, triton):
    if fn not in _jitted_helpers:
        _jitted_helpers[fn] = triton.jit(fn)  # before binding: a helper's module names itself
        _bind(fn.__globals__, triton)
    return _jitted_helpers[fn]


class jit:  # lower case: used as a decorator like triton.jit
    def __init__(self, fn) -> None:
        self.fn = fn
        self._kernel = None

    def __getitem__(self, grid):
        if self._kernel is None:
            triton = _import_triton()
            _bind(self.fn.__globals__, triton)  # the kernel bodies' `tl` and helpers
            self._kernel = triton.jit(self.fn)
        return self._kernel[grid]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def store_dtype(dtype, device) -> object:
    """The dtype a kernel should write an output of `dtype` in. Triton's CPU interpreter
    truncates fp32 -> bf16/fp16 casts (3.9 interpreter.py cast_impl: no rounding mode) where
    the GPU rounds to nearest even, so on the CPU kernels write fp32 and the launcher casts
    with torch (round to nearest even, as the GPU)."""
    import torch

    if device.type != "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


class LazyModule:
    """For a kernel file whose kernels call other Triton functions (helpers must be
    `triton.jit` module globals the kernels find by name): `jit = LazyModule(globals())`,
    decorate every Triton function with `@jit.mark`, and call `jit.materialize()` before the
    first launch; it imports Triton and jits them all in place, once, binding the module's
    `triton` and `tl` globals."""

    def __init__(self, module_globals: dict) -> None:
        self._globals = module_globals
        self._names: list[str] = []
        self._done = False

    def mark(self, fn):
        self._names.append(fn.__name__)
        return fn

    def materialize(self) -> None:
        if self._done:
            return
        triton = _import_triton()
        g = self._globals
        g["triton"] = triton
        _bind(g, triton)
        for name in self._names:
            g[name] = triton.jit(g[name])
        self._done = True
