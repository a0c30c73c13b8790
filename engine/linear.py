"""Linear layers whose weight stays in its checkpoint format.

Every projection of the model is an `engine.linear.Linear`. Its weight is stored the way
the checkpoint stores it (BF16, FP8 E4M3 with E8M0 128x128 block scales, packed FP4 with
E8M0 per-32 scales, INT2-G64) and dequantised on the fly per forward on the CPU path; the
fast GPU kernels replace `forward` without touching the model. Never dequantise the whole
model at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W.T (no bias: DeepSeek-V4 projections have none)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [out, in] tensor of `dtype` (dequantised when stored quantised)."""
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
