"""The prefix cache's second tier on disk (issue 17; ds4's idea): a cached sequence's state
outlives its pool slot and the process.

    disk = DiskPrefixCache(directory, max_bytes=20 << 30, fingerprint=model_fingerprint(c, dtype))
    pool = SlotPool(config, ..., prefix_cache=True, disk=disk)

When the pool evicts a cached slot (a new sequence needs it), or at `SlotPool.close()`, the
slot's rows are copied to host memory on the caller's thread (one device-to-host copy of
what the sequence wrote: tens of MB at 8K context) and written as a safetensors file by a
background thread, so decoding is not held up by the disk. A prompt the pool cannot continue
from memory is looked up here, with the pool's rule (engine/kv.py: the longest cached token
list that is a strict prefix of the prompt); a hit is read back into a fresh slot and the
engine prefills only the rest. A state read back is bit for bit the state written, so the
logits are those of a full prefill (tests/engine/test_kv_disk.py).

One file per cached sequence, `<fingerprint>-<sha256 of its ids>.safetensors`, holding its
ids and, per layer, the ring, the entries and indexer keys it wrote, and the compressor
rows. `fingerprint` names the model (its config and dtype): files of another model are never
listed, so never loaded. The directory is bounded by `max_bytes`: the least recently used
files are deleted first (use = written or hit; a restart orders them by mtime). A file that
fails to read (truncated, corrupt, another layout) is deleted and counts as a miss.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


def model_fingerprint(config: ModelConfig, dtype: torch.dtype) -> str:
    """16 hex digits naming a model's state layout: its config and activation dtype."""
    text = repr(sorted(asdict(config).items())) + str(dtype)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class DiskStats:
    hits: int = 0  # prompts continued from a file
    writes: int = 0  # files written
    evictions: int = 0  # files deleted for space
    errors: int = 0  # files that failed to write or read (deleted)


class DiskPrefixCache:
    def __init__(self, directory: str | Path, max_bytes: int, fingerprint: str) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the disk prefix cache needs a positive size limit, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.stats = DiskStats()
        # path -> (ids, bytes), least recently used first; ids are read from each file once
        self._files: OrderedDict[Path, tuple[tuple[int, ...], int]] = OrderedDict()
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-disk")
        self._pending: list[Future] = []
        for path in sorted(self.directory.glob(f"{fingerprint}-*{SUFFIX}"),
                           key=lambda p: p.stat().st_mtime):
            ids = self._read_ids(path)
            if ids is not None:
                self._files[path] = (ids, path.stat().st_size)
        self._shrink()

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._files.values())

    def __len__(self) -> int:
        return len(self._files)

    # -- write ---------------------------------------------------------------------------

    def put(self, ids: Sequence[int], tensors: dict[str, torch.Tensor]) -> None:
        """Write one sequence's state (host tensors the caller no longer touches) in the
        background; a file with these ids already there is only marked used."""
        ids = tuple(int(t) for t in ids)
        path = self.directory / f"{self.fingerprint}-{ids_digest(ids)}{SUFFIX}"
        with self._lock:
            if path in self._files:
                self._files.move_to_end(path)
                return
        tensors = {**tensors, "ids": torch.tensor(ids, dtype=torch.int64)}
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._writer.submit(self._write, path, ids, tensors))

    def _write(self, path: Path, ids: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_suffix(".tmp")
        try:
            save_file(tensors, str(tmp))
            tmp.replace(path)  # a reader never sees half a file
        except Exception as e:  # a full disk, a permission: the cache loses this entry only
            log.warning("disk prefix cache: could not write %s: %s", path, e)
            tmp.unlink(missing_ok=True)
            self.stats.errors += 1
            return
        with self._lock:
            self._files[path] = (ids, path.stat().st_size)
            self._files.move_to_end(path)
            self.stats.writes += 1
        self._shrink()

    def flush(self) -> None:
        """Wait for the writes in flight (tests, close)."""
        for f in list(self._pending):
            f.result()
        self._pending = []

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)

    def _shrink(self) -> None:
        with self._lock:
            while self._files and self.nbytes > self.max_bytes:
                path, _ = self._files.popitem(last=False)
                path.unlink(missing_ok=True)
                self.stats.evictions += 1

    # -- read ----------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int]) -> tuple[Path, int] | None:
        """(file, n) of the longest cached id list that is a strict prefix of `tokens`."""
        n_tokens = len(tokens)
        with self._lock:
            candidates = sorted(((len(ids), path) for path, (ids, _) in self._files.items()
                                 if len(ids) < n_tokens), reverse=True)
            for n, path in candidates:
                if tuple(tokens[:n]) == self._files[path][0]:
                    return path, n
        return None

    def get(self, path: Path) -> dict[str, torch.Tensor] | None:
        """The tensors of a file found by `lookup` (None, and the file deleted, if it fails
        to read). Marks it used."""
        try:
            tensors = load_file(str(path))
        except Exception as e:
            log.warning("disk prefix cache: dropping unreadable %s: %s", path, e)
            self._forget(path)
            self.stats.errors += 1
            return None
        with self._lock:
            if path in self._files:
                self._files.move_to_end(path)
        path.touch()  # LRU order survives a restart
        return tensors

    def forget(self, path: Path) -> None:
        """Drop a file whose contents did not fit (another layout under the same name)."""
        self._forget(path)
        self.stats.errors += 1

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._files.pop(path, None)
        path.unlink(missing_ok=True)

    def _read_ids(self, path: Path) -> tuple[int, ...] | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                return tuple(f.get_tensor("ids").tolist())
        except Exception as e:
            log.warning("disk prefix cache: dropping unreadable %s: %s", path, e)
            path.unlink(missing_ok=True)
            self.stats.errors += 1
            return None
