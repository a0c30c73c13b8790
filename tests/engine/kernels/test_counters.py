"""engine/kernels/_counters.py: zeroed buffers per device and stream lane, grown outside a
capture, the outgrown ones kept alive."""

from __future__ import annotations

import pytest
import torch

from engine import overlap
from engine.kernels import _counters
from tests.engine.kernels.conftest import DEVICE, ON_GPU


def test_grows_and_keeps_the_outgrown_buffer():
    device = torch.device(DEVICE)
    small = _counters.arrival_counters(device, 8)
    assert small.dtype == torch.int32 and small.numel() >= 8 and not small.any()
    again = _counters.arrival_counters(device, small.numel())
    assert again.data_ptr() == small.data_ptr()  # the same buffer while it is big enough
    big = _counters.arrival_counters(device, small.numel() * 4 + 1)
    assert big.numel() > small.numel() and not big.any()
    assert any(t.data_ptr() == small.data_ptr() for t in _counters._OUTGROWN)


@pytest.mark.skipif(not ON_GPU, reason="the side stream is CUDA's")
def test_the_side_stream_has_its_own_buffer():
    device = torch.device("cuda")
    main = _counters.arrival_counters(device, 16)
    x = torch.zeros(1, device=device)
    side = overlap.fork(x)
    with overlap.on(side):
        other = _counters.arrival_counters(device, 16)
    overlap.join(side)
    assert other.data_ptr() != main.data_ptr()
