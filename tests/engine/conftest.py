"""Shared helpers for the engine tests: a tiny random fp32 model and recorders for the
selection margins (routing top-k, indexer top-k) that decide whether two implementations
can be compared exactly (spec section 7).

Set DSML_TEST_DEVICE=cuda to run the model tests on a GPU (default: cpu).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

# Without CUDA the Triton kernels run under Triton's interpreter (every engine test that takes
# mode("triton"), not only tests/engine/kernels): set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.attention import Indexer
from engine.config import ModelConfig
from engine.model import Transformer
from engine.moe import Gate

DEVICE = os.environ.get("DSML_TEST_DEVICE", "cpu")

# One intra-op thread: the tiny model's ops are small, and on the shared 2-core CI machine
# two OpenMP threads spin against other processes: a decode step measured 430 ms with 2
# threads vs 36 ms with 1 under load ~5. DSML_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DSML_TEST_THREADS", "1")))


def tiny_config(**overrides) -> ModelConfig:
    """ModelConfig.tiny() with QAT off (the plain-precision path `transformers` implements)
    unless overridden."""
    return ModelConfig.tiny().replace(**{"qat": False, **overrides})


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    return Transformer(tiny_config(**overrides), dtype=dtype).init_random_(seed).to(DEVICE)


def random_tokens(batch: int, length: int, seed: int, vocab: int = 129280) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(DEVICE)


class SelectionRecorder:
    """Records, in call order, every learned-routing and indexer top-k decision of the engine
    model together with each row's margin: the gap between the last selected and the first
    rejected candidate (inf when nothing had to be rejected). Which candidate wins a
    near-tie is implementation defined (spec section 7), so a reference can replay these
    decisions where margins are small and must reproduce them where margins are clear."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.routes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (experts [N, K], gap [N])
        self.indexes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (selected [n, N], gap [n])
        route, select = Gate.route, Indexer.select_row
        rec = self

        def route_spy(gate: Gate, x: torch.Tensor, ids: torch.Tensor):
            weights, experts = route(gate, x, ids)
            if not gate.hash:
                logits = F.linear(x.float(), gate.dense_weight(torch.float32))
                biased = F.softplus(logits).sqrt() + gate.bias
                top = biased.topk(gate.topk + 1, dim=-1).values
                rec.routes.append((experts.clone(), top[:, -2] - top[:, -1]))
            return weights, experts

        def select_spy(indexer: Indexer, *args, **kwargs):
            selected, scores = select(indexer, *args, **kwargs)
            k = indexer.config.index_topk
            gap = torch.full((scores.shape[0],), float("inf"), device=scores.device)
            if scores.shape[1] > k:
                top = scores.topk(k + 1, dim=-1).values  # -inf marks entries not yet visible
                rows = top[:, -1].isfinite()  # queries with more visible entries than k
                gap[rows] = top[rows, -2] - top[rows, -1]
            rec.indexes.append((selected.clone(), gap))
            return selected, scores

        monkeypatch.setattr(Gate, "route", route_spy)
        monkeypatch.setattr(Indexer, "select_row", select_spy)


@pytest.fixture
def selections(monkeypatch: pytest.MonkeyPatch) -> SelectionRecorder:
    return SelectionRecorder(monkeypatch)
