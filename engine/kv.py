"""The KV slot pool: every layer's per-sequence state preallocated for `max_seqs` sequences.

    pool = SlotPool(config, max_seqs=16, max_len=65536, device="cuda", dtype=torch.bfloat16)
    slot = pool.acquire()                       # a free row (ValueError when none is left)
    seq = pool.sequence_state(slot)             # SequenceState whose tensors VIEW pool[slot]
    model(prompt, BatchState([seq]))            # the reference prefill writes into the pool
    ...                                         # engine.decode reads/writes pool[slot] directly
    pool.release(slot)

Per layer (the main layers, then the MTP block(s), numbered as `SequenceState.layers`) the
pool holds the `engine.cache.LayerState` fields with a leading slot dimension S:

  window      [S, W, D]            entries     [S, max_len // r, D]      (r = 4 or 128)
  comp_kv     [S, R, C] fp32       comp_score  [S, R, C] fp32
  index_keys  [S, max_len // 4, Di]  index_kv / index_score [S, 8, 2 Di] fp32  (r = 4 only)

S = max_seqs + 1: the last row (`scratch_slot`) is never handed out; padded rows of a static
decode batch point at it, so their writes land where nobody reads. A sequence's state is a
set of views, so the reference `Transformer.forward` (prefill, or decode on the reference
path) and the fast decode step share the same memory without copies.

`acquire()` resets what a fresh `SequenceState` would have and a later token can read before
writing it: the compressor rows (score -inf). Window slots and entries are only read once the
sequence has written them (both paths mask by position), so they keep the previous owner's
finite values; the pool starts zeroed so nothing uninitialised (NaN) is ever multiplied by
a zero weight.

Not here yet (a later issue): paged KV (fixed-size pages instead of one max_len row per
slot) and the prefix cache. The slot indirection is what they will replace: decode addresses
state only through `slots`, never through a sequence's own tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.cache import LayerState, SequenceState
from engine.config import RATIO_SPARSE, RATIO_WINDOW, ModelConfig


@dataclass
class PoolLayer:
    """One layer's tensors for all slots (None where the layer kind has no such state)."""

    ratio: int
    window: torch.Tensor
    entries: torch.Tensor | None = None
    comp_kv: torch.Tensor | None = None
    comp_score: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None
    index_kv: torch.Tensor | None = None
    index_score: torch.Tensor | None = None

    def view(self, slot: int, max_len: int) -> LayerState:
        """LayerState of `slot` whose tensors are views of this layer's rows."""

        def row(t: torch.Tensor | None, n: int | None = None) -> torch.Tensor | None:
            if t is None:
                return None
            return t[slot] if n is None else t[slot, :n]

        r = self.ratio
        n_entries = max_len // r if r else None
        return LayerState(
            r,
            self.window[slot],
            row(self.entries, n_entries),
            row(self.comp_kv),
            row(self.comp_score),
            row(self.index_keys, n_entries),
            row(self.index_kv),
            row(self.index_score),
        )

    def reset_(self, slot: int) -> None:
        for kv, score in ((self.comp_kv, self.comp_score), (self.index_kv, self.index_score)):
            if kv is not None:
                kv[slot].zero_()
                score[slot].fill_(float("-inf"))


def _rows(slots: int, ratio: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # same layout as engine.cache._compressor_rows: r = 4 keeps two blocks at double width
    overlap = ratio == RATIO_SPARSE
    rows, width = (2 * ratio, 2 * dim) if overlap else (ratio, dim)
    kv = torch.zeros(slots, rows, width, dtype=torch.float32, device=device)
    score = torch.full((slots, rows, width), float("-inf"), dtype=torch.float32, device=device)
    return kv, score


class SlotPool:
    def __init__(self, config: ModelConfig, max_seqs: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        if max_seqs < 1 or max_len < 1:
            raise ValueError(f"max_seqs and max_len must be positive, got {max_seqs}, {max_len}")
        self.config = config
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.scratch_slot = max_seqs  # padded decode rows write here
        s, d, di = max_seqs + 1, config.head_dim, config.index_head_dim
        n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
        self.layers: list[PoolLayer] = []
        for i in range(n_layers):
            r = config.compress_ratio(i)
            layer = PoolLayer(r, torch.zeros(s, config.sliding_window, d, dtype=dtype,
                                             device=self.device))
            if r != RATIO_WINDOW:
                layer.entries = torch.zeros(s, max_len // r, d, dtype=dtype, device=self.device)
                layer.comp_kv, layer.comp_score = _rows(s, r, d, self.device)
            if r == RATIO_SPARSE:
                layer.index_keys = torch.zeros(s, max_len // r, di, dtype=dtype,
                                               device=self.device)
                layer.index_kv, layer.index_score = _rows(s, r, di, self.device)
            self.layers.append(layer)
        self._free = list(range(max_seqs - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in vars(layer).values() if isinstance(t, torch.Tensor))

    def acquire(self) -> int:
        """A free slot with a fresh sequence's compressor state."""
        if not self._free:
            raise ValueError(f"KV pool is full: all {self.max_seqs} slots are in use")
        slot = self._free.pop()
        for layer in self.layers:
            layer.reset_(slot)
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.max_seqs or slot in self._free:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)

    def sequence_state(self, slot: int, max_len: int | None = None) -> SequenceState:
        """A SequenceState of length 0 viewing pool[slot] (max_len <= the pool's)."""
        max_len = self.max_len if max_len is None else max_len
        if not 0 < max_len <= self.max_len:
            raise ValueError(f"max_len must be in 1..{self.max_len}, got {max_len}")
        if not 0 <= slot <= self.scratch_slot:
            raise ValueError(f"slot must be in 0..{self.scratch_slot}, got {slot}")
        return SequenceState([layer.view(slot, max_len) for layer in self.layers], max_len,
                             slot=slot)
