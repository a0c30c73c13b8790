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

Prefix cache (issue 17, `prefix_cache=True`): a finished sequence's slot is not freed but
kept, with the exact token ids its state has consumed, in an LRU of cached slots:

    slot, cached = pool.acquire_prefix(prompt)  # reuse: pool[slot] already holds prompt[:cached]
    ...                                         # prefill prompt[cached:] only
    pool.release(slot, consumed=ids[:state.length])   # cache it (None: free it)

A slot is in exactly one of three sets: free, in use (pinned: the running sequence owns it;
never evicted, never shared) or cached (idle, evictable). `acquire()` takes a free slot
first and evicts the least recently cached one only when none is free, so the cache costs
no capacity: it lives in slots nobody is using.

Reuse is from a cached sequence's END only: a prompt reuses a cached slot iff it starts
with the slot's whole token list and is longer (at least one token must be prefilled to
get the next token's logits). Why not any shared prefix: DeepSeek-V4's state is a function
of the prefix, but not a per-token log. The window ring holds only the last 128 positions
(slot p % 128, overwritten as positions advance) and the compressor rows only the
unfinished block(s); the compressed entries and indexer keys below a position are
append-only and would be reusable, but the ring and the rows at an earlier position are
gone. Rolling back to position q < end would need (a) snapshots of ring + compressor rows
at boundaries (each ~W x D per layer, i.e. a window's worth of KV per snapshot and layer,
taken during prefill, which costs copies on the hot path for prompts that may never be
revisited), or (b) recomputing the last <= 128 positions before q (the ring) through all
layers, which needs their hidden inputs, i.e. a full forward of those tokens anyway plus
entries exactly re-pooled. The agent tool loop, the case issue 17 is about, always
continues from the end: with tools in the request every turn's reasoning is kept
(dsml.md 3.12), so the follow-up prompt is the previous prompt + the generated tokens +
the tool result (tests/engine/test_prefix_cache.py checks this with the real renderer).
A prompt that diverges inside the cached tokens (an edited history, a dropped reasoning
block when no tools are offered) misses and prefills from 0; that is exact by construction.

The token list is exactly what the state consumed: the engine's last sampled token (EOS,
usually) was never fed through the model, so it caches `ids[:state.length]` =
prompt + generated[:-1]; the follow-up prompt then starts with that and continues with the
EOS token, which the reuse prefills.

Lookup: a dict from the first PREFIX_KEY_TOKENS ids to the cached slots that start with
them, then an exact comparison of the candidates (longest first). Cost: O(key + the
compared prefix), bounded by max_seqs candidates; it runs on the engine's worker thread.
Sequences shorter than PREFIX_KEY_TOKENS are not cached (nothing worth saving).

Disk tier (`disk=engine.kv_disk.DiskPrefixCache(...)`, off by default): a cached slot the
pool evicts, and every cached slot at `close()`, is written to disk; a prompt no cached slot
continues is looked up there and, on a hit, read back into a fresh slot (engine/kv_disk.py).

Not here yet: paged KV (fixed-size pages instead of one max_len row per slot), and reuse of
a cached prefix by several sequences at once (a page-level copy-on-write, or a row copy).
The slot indirection is what pages will replace: decode addresses state
only through `slots`, never through a sequence's own tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.cache import LayerState, SequenceState
from engine.config import RATIO_SPARSE, RATIO_WINDOW, ModelConfig
from engine.kv_disk import DiskPrefixCache

PREFIX_KEY_TOKENS = 16  # ids that key the lookup dict; shorter sequences are not cached


@dataclass
class PrefixCacheStats:
    """Counters of the prefix cache (plain ints: the proxy's collector reads them)."""

    hits: int = 0  # acquire_prefix found a cached slot to continue
    misses: int = 0  # acquire_prefix found none (prefix cache on)
    evictions: int = 0  # cached slots freed for a new sequence
    tokens_saved: int = 0  # prompt tokens not prefilled thanks to hits


@dataclass
class PoolLayer(LayerState):
    """One layer's tensors for all slots: LayerState's fields with a leading slot dimension
    (None where the layer kind has no such state)."""

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
                 dtype: torch.dtype = torch.bfloat16, prefix_cache: bool = False,
                 disk: DiskPrefixCache | None = None) -> None:
        if max_seqs < 1 or max_len < 1:
            raise ValueError(f"max_seqs and max_len must be positive, got {max_seqs}, {max_len}")
        self.config = config
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.prefix_cache = prefix_cache
        self.disk = disk if prefix_cache else None
        self.stats = PrefixCacheStats()
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
        self._in_use: set[int] = set()  # pinned: a running sequence owns them
        self._cached: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # slot -> ids; LRU first
        self._index: dict[tuple[int, ...], set[int]] = {}  # first PREFIX_KEY_TOKENS ids -> slots
        # The engine acquires on its worker thread and releases on the event loop (close()
        # may release while a prefill looks up): the books change under one lock.
        self._lock = threading.RLock()

    @property
    def num_free(self) -> int:
        """Slots a new sequence can get (free or cached: a cached one is evicted for it)."""
        return len(self._free) + len(self._cached)

    @property
    def num_in_use(self) -> int:
        return len(self._in_use)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def cached_tokens(self, slot: int) -> tuple[int, ...] | None:
        """The ids a cached slot's state has consumed (None: not cached)."""
        return self._cached.get(slot)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in vars(layer).values() if isinstance(t, torch.Tensor))

    def acquire(self) -> int:
        """A slot with a fresh sequence's compressor state: a free one, else the least
        recently cached one (evicted). ValueError when every slot is in use."""
        with self._lock:
            if self._free:
                slot = self._free.pop()
            elif self._cached:
                slot = next(iter(self._cached))  # the least recently cached
                self._spill(slot)
                self._uncache(slot)
                self.stats.evictions += 1
            else:
                raise ValueError(f"KV pool is full: all {self.max_seqs} slots are in use")
            for layer in self.layers:
                layer.reset_(slot)
            self._in_use.add(slot)
            return slot

    def lookup(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(slot, n) of the longest cached sequence whose n ids are a strict prefix of
        `tokens`, or None. No side effect."""
        with self._lock:
            if not self._cached or len(tokens) <= PREFIX_KEY_TOKENS:
                return None
            candidates = self._index.get(tuple(tokens[:PREFIX_KEY_TOKENS]))
            if not candidates:
                return None
            n_tokens = len(tokens)
            best: tuple[int, int] | None = None
            for slot in sorted(candidates, key=lambda s: -len(self._cached[s])):
                cached = self._cached[slot]
                n = len(cached)
                # strict: the last prompt token must be prefilled to give the next token's logits
                if n < n_tokens and tuple(tokens[:n]) == cached:
                    best = (slot, n)
                    break
            return best

    def acquire_prefix(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(slot, n): a slot whose state already holds tokens[:n] (a prefix-cache hit; the
        caller prefills tokens[n:] at positions n..), or a fresh slot and n = 0."""
        with self._lock:
            if self.prefix_cache:
                hit = self.lookup(tokens)
                if hit is not None:
                    slot, n = hit
                    self._uncache(slot)
                    self._in_use.add(slot)
                    self.stats.hits += 1
                    self.stats.tokens_saved += n
                    return slot, n
                restored = self._from_disk(tokens)
                if restored is not None:
                    return restored
                self.stats.misses += 1
            return self.acquire(), 0

    def release(self, slot: int, consumed: Sequence[int] | None = None) -> None:
        """Give a slot back. `consumed`: exactly the ids its state has consumed (positions
        0..len-1), which keeps it in the prefix cache; None (or the cache off) frees it."""
        with self._lock:
            if slot not in self._in_use:
                raise ValueError(f"slot {slot} is not in use")
            self._in_use.discard(slot)
            if (self.prefix_cache and consumed is not None
                    and PREFIX_KEY_TOKENS < len(consumed) <= self.max_len):
                ids = tuple(int(t) for t in consumed)
                self._cached[slot] = ids
                self._index.setdefault(ids[:PREFIX_KEY_TOKENS], set()).add(slot)
            else:
                self._free.append(slot)

    def close(self) -> None:
        """Write every cached slot to the disk tier (when there is one) and wait for it: a
        restart continues the conversations this process held."""
        with self._lock:
            if self.disk is None:
                return
            for slot in list(self._cached):
                self._spill(slot)
            self.disk.close()

    # -- the disk tier ---------------------------------------------------------------------

    def _slot_rows(self, slot: int, length: int) -> dict[str, torch.Tensor]:
        """Views of what a sequence of `length` positions wrote into pool[slot]: per layer
        the ring, the entries and indexer keys below `length`, the compressor rows."""
        rows = {}
        for i, layer in enumerate(self.layers):
            for name, t in vars(layer).items():
                if isinstance(t, torch.Tensor):
                    row = t[slot]
                    rows[f"{i}.{name}"] = (row[: length // layer.ratio]
                                           if name in ("entries", "index_keys") else row)
        return rows

    def slot_tensors(self, slot: int, length: int) -> dict[str, torch.Tensor]:
        """`_slot_rows` copied to the host (what the disk tier writes)."""
        return {k: v.to("cpu", copy=True) for k, v in self._slot_rows(slot, length).items()}

    def restore(self, slot: int, tensors: dict[str, torch.Tensor], length: int) -> None:
        """Write `slot_tensors`' output back into pool[slot]. ValueError, before anything
        is copied, when it does not fit this pool's layout."""
        rows = self._slot_rows(slot, length)
        if set(tensors) - {"ids"} != set(rows):
            raise ValueError("the saved state does not have this pool's layers")
        for key, row in rows.items():
            src = tensors[key]
            if src.shape != row.shape or src.dtype != row.dtype:
                raise ValueError(f"{key}: saved {tuple(src.shape)} {src.dtype}, pool has "
                                 f"{tuple(row.shape)} {row.dtype}")
        for key, row in rows.items():
            row.copy_(tensors[key])

    def _spill(self, slot: int) -> None:
        if self.disk is not None:
            ids = self._cached[slot]
            self.disk.put(ids, self.slot_tensors(slot, len(ids)))

    def _from_disk(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(slot, n) with the disk tier's longest continuable state read into a fresh slot,
        or None (no tier, no hit, or the file did not read)."""
        if self.disk is None or len(tokens) <= PREFIX_KEY_TOKENS:
            return None
        found = self.disk.lookup(tokens)
        if found is None:
            return None
        path, n = found
        tensors = self.disk.get(path)
        if tensors is None:
            return None
        slot = self.acquire()
        try:
            self.restore(slot, tensors, n)
        except ValueError:
            self.release(slot)
            self.disk.forget(path)
            return None
        self.disk.stats.hits += 1
        self.stats.hits += 1
        self.stats.tokens_saved += n
        return slot, n

    def clear_cache(self) -> None:
        """Free every cached slot (e.g. when the weights change)."""
        with self._lock:
            for slot in list(self._cached):
                self._uncache(slot)
                self._free.append(slot)

    def _uncache(self, slot: int) -> None:
        ids = self._cached.pop(slot)
        key = ids[:PREFIX_KEY_TOKENS]
        slots = self._index[key]
        slots.discard(slot)
        if not slots:
            del self._index[key]

    def sequence_state(self, slot: int, max_len: int | None = None) -> SequenceState:
        """A SequenceState of length 0 viewing pool[slot] (max_len <= the pool's)."""
        max_len = self.max_len if max_len is None else max_len
        if not 0 < max_len <= self.max_len:
            raise ValueError(f"max_len must be in 1..{self.max_len}, got {max_len}")
        if not 0 <= slot <= self.scratch_slot:
            raise ValueError(f"slot must be in 0..{self.scratch_slot}, got {slot}")
        return SequenceState([layer.view(slot, max_len) for layer in self.layers], max_len,
                             slot=slot)
