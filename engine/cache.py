"""Per-sequence KV state of DeepSeek-V4-Flash (spec section 3), for a batch of sequences.

A sequence's state is everything a later token can read about the earlier ones, per layer:

  window        [W, D]     raw kv of the last W = 128 positions, slot p % W (ring)
  entries       [N_r, D]   compressed entries j < length // r (r = 4 or 128; N_r = max_len // r)
  comp_kv/score [R, C]     the compressor's per-token rows of the unfinished block(s), fp32,
                           slot p % R: r = 128 keeps one block (R = 128, C = 512); the
                           overlapping r = 4 keeps the previous block too (R = 8, C = 1024)
  index_keys    [N_4, Di]  the indexer's compressed keys (ratio-4 layers only)
  index_kv/score [8, 2*Di] the indexer compressor's rows (ratio-4 layers only)

Nothing else depends on history, so feeding a sequence in any chunking (one prefill, chunked
prefill, prefill after a cached prefix, one token at a time) produces the same state and the
same logits. The window ring and compressor rows are overwritten as positions advance, so a
sequence cannot be rolled back; fork it with `clone()` before speculating.

`BatchState` is the explicit batch argument of `Transformer.forward`: row b of the token
matrix belongs to `state.seqs[b]`, whose `length` gives that row's first position. The model
advances each `length` by the number of valid tokens of its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.config import RATIO_SPARSE, RATIO_WINDOW, ModelConfig


@dataclass
class LayerState:
    """One layer's (or MTP block's) state for one sequence; see the module docstring."""

    ratio: int
    window: torch.Tensor
    entries: torch.Tensor | None = None
    comp_kv: torch.Tensor | None = None
    comp_score: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None
    index_kv: torch.Tensor | None = None
    index_score: torch.Tensor | None = None

    def clone(self) -> LayerState:
        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return LayerState(
            self.ratio,
            self.window.clone(),
            c(self.entries),
            c(self.comp_kv),
            c(self.comp_score),
            c(self.index_keys),
            c(self.index_kv),
            c(self.index_score),
        )


def _compressor_rows(
    ratio: int, head_dim: int, device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # r = 4 overlaps: entry j pools block j-1 (channels [:D]) and block j (channels [D:]), so
    # two blocks of rows at double width are kept; r = 128 pools one block at width D.
    overlap = ratio == RATIO_SPARSE
    rows, width = (2 * ratio, 2 * head_dim) if overlap else (ratio, head_dim)
    kv = torch.zeros(rows, width, dtype=torch.float32, device=device)
    score = torch.full((rows, width), float("-inf"), dtype=torch.float32, device=device)
    return kv, score


def new_layer_state(
    config: ModelConfig, ratio: int, max_len: int, device=None, dtype=torch.bfloat16
) -> LayerState:
    d = config.head_dim
    state = LayerState(ratio, torch.zeros(config.sliding_window, d, dtype=dtype, device=device))
    if ratio != RATIO_WINDOW:
        state.entries = torch.zeros(max_len // ratio, d, dtype=dtype, device=device)
        state.comp_kv, state.comp_score = _compressor_rows(ratio, d, device)
    if ratio == RATIO_SPARSE:
        di = config.index_head_dim
        state.index_keys = torch.zeros(max_len // ratio, di, dtype=dtype, device=device)
        state.index_kv, state.index_score = _compressor_rows(ratio, di, device)
    return state


@dataclass
class SequenceState:
    """All layers' state of one sequence. `length` counts the tokens the main layers have
    seen (the next token's position); `mtp_length` the same for the MTP block(s). `slot` is
    the row of an `engine.kv.SlotPool` whose memory the layer tensors view (None: the state
    owns its tensors); the fast decode step reads and writes the pool by that row."""

    layers: list[LayerState]
    max_len: int
    length: int = 0
    mtp_length: int = 0
    slot: int | None = None

    @classmethod
    def new(
        cls, config: ModelConfig, max_len: int, device=None, dtype=torch.bfloat16
    ) -> SequenceState:
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        n = config.num_hidden_layers + config.num_nextn_predict_layers
        layers = [
            new_layer_state(config, config.compress_ratio(i), max_len, device, dtype)
            for i in range(n)
        ]
        return cls(layers, max_len)

    def clone(self) -> SequenceState:
        """A copy that owns its tensors (slot None), also when this state views a pool."""
        return SequenceState(
            [layer.clone() for layer in self.layers], self.max_len, self.length, self.mtp_length
        )


@dataclass
class BatchState:
    """The sequences of one forward call, row b <-> seqs[b]."""

    seqs: list[SequenceState] = field(default_factory=list)

    @classmethod
    def new(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device=None,
        dtype=torch.bfloat16,
    ) -> BatchState:
        return cls([SequenceState.new(config, max_len, device, dtype) for _ in range(batch_size)])

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, row: int) -> SequenceState:
        return self.seqs[row]

    def select(self, rows: Sequence[int]) -> BatchState:
        """A batch of some of these sequences (shared, not copied: updates show in both)."""
        return BatchState([self.seqs[r] for r in rows])

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.seqs]

    @property
    def mtp_lengths(self) -> list[int]:
        return [s.mtp_length for s in self.seqs]


@dataclass
class ForwardBatch:
    """Per-call batch metadata the model builds from a `BatchState` and passes down explicitly:
    row b's first position `starts[b]`, its number of valid tokens `counts[b]` (right
    padding after that), `positions` [B, T] = starts[b] + t, and which layer states to use
    (main layers, or the MTP blocks which continue the layer numbering)."""

    state: BatchState
    starts: list[int]
    counts: list[int]
    positions: torch.Tensor

    def layer_states(self, layer_id: int) -> list[LayerState]:
        return [seq.layers[layer_id] for seq in self.state.seqs]
