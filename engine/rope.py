"""Partial interleaved RoPE of DeepSeek-V4, with YaRN on the compressed layers.

Only the LAST `qk_rope_head_dim` (64) channels of a vector rotate, in interleaved pairs
(2i, 2i+1) as complex numbers, by angle p * inv_freq[i]. Ratio-0 layers use base 10000 and
no scaling; compressed layers (and their compressors and indexer) use base 160000 with YaRN
(factor 16, original 65536, beta_fast 32, beta_slow 1) and no attention mscale (DeepSeek's
reference leaves the cos/sin unscaled). The attention output is rotated back by the query
position (`inverse=True`) because V equals K and carries the keys' rotation.
"""

from __future__ import annotations

import math

import torch

from engine.config import RATIO_WINDOW, ModelConfig


def rope_inv_freq(config: ModelConfig, ratio: int, device=None) -> torch.Tensor:
    """[R/2] fp32 inverse frequencies of a layer with compression ratio `ratio`."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta if ratio == RATIO_WINDOW else config.compress_rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if ratio == RATIO_WINDOW:
        return inv_freq

    # YaRN (DeepSeek's precompute_freqs_cis): dims rotating fewer than beta_slow times over
    # the original context are interpolated by 1/factor, those above beta_fast kept, a linear
    # ramp in between.
    def correction_dim(rotations: float) -> float:
        orig = config.rope_original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # DeepSeek's guard against a zero-width ramp
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    keep = 1 - ramp.clamp(0, 1)  # 1 = extrapolate (keep the frequency), 0 = interpolate
    return inv_freq / config.rope_factor * (1 - keep) + inv_freq * keep


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, R/2] (fp32)."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] channels of x in interleaved pairs; cos/sin broadcast
    against x[..., ::2] of that slice. Computed in fp32, returned in x's dtype."""
    rd = 2 * cos.shape[-1]
    if inverse:
        sin = -sin
    rope = x[..., -rd:].float()
    a, b = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-rd], rotated.to(x.dtype)], dim=-1)
