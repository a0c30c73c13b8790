"""Every launcher is capturable in a CUDA graph (so it makes no host sync: a sync while
capturing raises) and a replay on refilled inputs equals an eager run. GPU only: the CPU
interpreter has no graphs; the CPU tests of each op cover its values."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.kernels import decode_attention as da
from engine.kernels import hc, indexer_scores, indexer_topk, rmsnorm_rope

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

CONFIG = ModelConfig.flash()
S, H, M = CONFIG.hc_mult, CONFIG.hidden_size, CONFIG.hc_mix_dim


def replay_matches_eager(fn, first: torch.Tensor, *rest) -> None:
    """Capture fn(first, *rest), refill `first` in place, replay, compare with eager."""
    fn(first, *rest)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(first, *rest)
    first.copy_(torch.randn_like(first.float()).to(first.dtype))
    graph.replay()
    want = fn(first, *rest)
    for got, ref in zip(out if isinstance(out, tuple) else (out,),
                        want if isinstance(want, tuple) else (want,), strict=True):  # fmt: skip
        assert torch.equal(got, ref)


def test_decode_attention() -> None:
    B, N, kc = 4, 1024, 512
    dev, bf16 = "cuda", torch.bfloat16
    window = torch.randn(B, 128, 512, device=dev, dtype=bf16)
    entries = torch.randn(B, N, 512, device=dev, dtype=bf16)
    idx = torch.rand(B, N, device=dev).argsort(-1)[:, :kc].contiguous()
    idx[0, 100:] = -1
    slots, positions = torch.arange(B, device=dev), torch.full((B,), 4095, device=dev)
    sink = torch.randn(64, device=dev)
    q = torch.randn(B, 64, 512, device=dev, dtype=bf16)
    replay_matches_eager(
        lambda q: da.decode_attention(q, window, entries, slots, positions, idx, sink, 0.044), q
    )


def test_hc_ops() -> None:
    dev = "cuda"
    h = torch.randn(4, S, H, device=dev, dtype=torch.bfloat16)
    y = torch.randn(4, H, device=dev, dtype=torch.bfloat16)
    fn = torch.randn(M, S * H, device=dev) * 0.01
    scale, base = torch.ones(3, device=dev), torch.randn(M, device=dev)
    post, comb = torch.rand(4, S, device=dev), torch.rand(4, S, S, device=dev)
    replay_matches_eager(lambda h: hc.hc_pre(h, fn, scale, base, CONFIG), h)
    replay_matches_eager(lambda y: hc.hc_post(y, h, post, comb), y)
    replay_matches_eager(lambda y: hc.hc_post_pre(y, h, post, comb, fn, scale, base, CONFIG), y)
    replay_matches_eager(
        lambda h: hc.hc_head(h, fn[:S].contiguous(), scale[:1], base[:S], CONFIG), h
    )


def test_indexer_ops() -> None:
    dev = "cuda"
    keys = torch.randn(4, 8192, 128, device=dev, dtype=torch.bfloat16)
    slots, positions = torch.arange(4, device=dev), torch.full((4,), 32767, device=dev)
    w = torch.randn(4, 64, device=dev) * 0.01
    q = torch.randn(4, 64, 128, device=dev)
    replay_matches_eager(lambda q: indexer_scores.indexer_scores(q, keys, slots, positions, w), q)
    scores = torch.randn(4, 8192, device=dev)
    replay_matches_eager(lambda s: indexer_topk.indexer_topk(s, 512), scores)


def test_rmsnorm_rope_ops() -> None:
    dev = "cuda"
    angles = torch.rand(4, 32, device=dev) * 100
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(4, 64, 512, device=dev, dtype=torch.bfloat16)
    weight = torch.ones(4096, device=dev, dtype=torch.bfloat16)
    replay_matches_eager(lambda q: rmsnorm_rope.rmsnorm_rope(q, None, cos, sin, 1e-6), q)
    replay_matches_eager(lambda q: rmsnorm_rope.rope(q, cos, sin, inverse=True), q)
    x = torch.randn(4, 4096, device=dev, dtype=torch.bfloat16)
    replay_matches_eager(lambda x: rmsnorm_rope.rmsnorm(x, weight, 1e-6), x)
