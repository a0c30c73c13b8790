"""Kernel tests run the Triton kernels on the CPU through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before `triton` is imported: `triton.jit` reads it when a kernel
is decorated, so this runs at collection, before the test modules import the kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
