"""Triton kernels of the engine's fast path: one op per file, each with its launcher.

Every launcher takes the Triton kernel or the op's plain PyTorch reference through one
switch, `use_triton(tensor)`, never through scattered `if cuda:` checks:

  mode "auto"       (default) Triton on CUDA tensors, the reference elsewhere
  mode "triton"     Triton everywhere: CPU tensors need TRITON_INTERPRET=1 (the CI tests)
  mode "reference"  the reference everywhere (the oracle; `--engine-path reference`)

The mode is process-wide state set once by whoever builds the engine (the proxy's settings,
a test fixture); nothing here reads the environment.

Programmatic dependent launch (PDL, Hopper and newer): `pdl_launch(tensor)` gives the launch
keywords that let a kernel be launched while the kernel before it on the stream still runs.
Every kernel taking them calls `wait_for_inputs(PDL)` (engine/kernels/_device_math.py) before
it touches anything another kernel writes (only constant weights are loaded before): that
holds it until the kernel before has finished and its writes are visible, then lets the
next one launch. What is saved is the gap between two dependent kernels (launch latency
and the new grid's ramp), about a microsecond each, ~1,100 times a decode step; a CUDA graph
keeps the programmatic edges. Only inside `graph_launches()` (a graph's warm-up and capture),
on by default, `set_pdl(False)` turns it off: on one H100 the 20-layer graph went from 3.94
to 3.70 ms a step (docs/benchmarks.md, eighth session).
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


# graph: how many graph_launches() blocks are open (PDL applies only inside one)
_pdl = {"on": True, "graph": 0, "capable": {}}


def set_pdl(on: bool) -> None:
    _pdl["on"] = bool(on)


def pdl_enabled() -> bool:
    return _pdl["on"]


def pdl_capable(t: torch.Tensor) -> bool:
    """Whether t's device can launch with PDL (CUDA, sm_90 or newer)."""
    if not t.is_cuda:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    capable = _pdl["capable"].get(index)
    if capable is None:
        capable = _pdl["capable"][index] = torch.cuda.get_device_capability(index)[0] >= 9
    return capable


@contextlib.contextmanager
def graph_launches() -> Iterator[None]:
    """Kernels launched inside take PDL (when on and the device can): a CUDA graph's warm-up
    and capture (engine/runner.py). Eager launches outside do not: Triton's PDL launch path
    doubled the host time of an eager step (101 against 49 ms, 20 layers, one H100), and
    only a graph's replay gains from it."""
    _pdl["graph"] += 1
    try:
        yield
    finally:
        _pdl["graph"] -= 1


def pdl_launch(t: torch.Tensor) -> dict:
    """{"PDL": True, "launch_pdl": True} for a kernel launched on t's CUDA device inside
    graph_launches() when PDL is on and the device can; {} otherwise (the CPU interpreter
    knows neither)."""
    if not (_pdl["on"] and _pdl["graph"]) or not pdl_capable(t):
        return {}
    return {"PDL": True, "launch_pdl": True}


def use_triton(t: torch.Tensor) -> bool:
    """Whether a launcher given `t` (its main input) should take the Triton kernel."""
    if _mode == "reference":
        return False
    if _mode == "triton":
        return True
    return t.is_cuda and triton_available()
