"""The prefix cache's disk tier (engine/kv_disk.py, SlotPool(disk=...)) on the tiny model: an
evicted conversation comes back from disk bit for bit and continues as a fresh prefill would,
across a restart; the directory keeps to its size limit; another model's files and damaged
files are never loaded.
"""

from __future__ import annotations

import torch

from engine.cache import BatchState
from engine.kv import SlotPool
from engine.kv_disk import DiskPrefixCache, model_fingerprint
from tests.engine.conftest import DEVICE, random_tokens, tiny_model

MAX_LEN = 256


def _ids(n: int, seed: int) -> list[int]:
    return random_tokens(1, n, seed=seed, vocab=1000)[0].tolist()


def _disk(tmp_path, model, max_bytes: int = 1 << 30, dtype=torch.float32) -> DiskPrefixCache:
    return DiskPrefixCache(tmp_path, max_bytes, model_fingerprint(model.config, dtype))


def _pool(model, disk, max_seqs: int = 1) -> SlotPool:
    return SlotPool(model.config, max_seqs=max_seqs, max_len=MAX_LEN, device=DEVICE,
                    dtype=torch.float32, prefix_cache=True, disk=disk)


def _prefill(model, pool: SlotPool, ids: list[int]) -> int:
    """A conversation prefilled into a fresh slot and cached; returns its slot."""
    slot, n = pool.acquire_prefix(ids)
    assert n == 0
    seq = pool.sequence_state(slot)
    model(torch.tensor([ids], device=DEVICE), BatchState([seq]), last_only=True)
    pool.release(slot, consumed=ids)
    return slot


def _continue(model, pool: SlotPool, follow: list[int]) -> tuple[torch.Tensor, int]:
    slot, n = pool.acquire_prefix(follow)
    seq = pool.sequence_state(slot)
    seq.length = n
    logits = model(torch.tensor([follow[n:]], device=DEVICE), BatchState([seq]))[0]
    pool.release(slot)
    return logits, n


def test_an_evicted_conversation_continues_from_disk_as_a_fresh_prefill(tmp_path):
    """One slot: conversation A (past the window and a ratio-128 boundary) is evicted by B,
    written to disk, and A's follow-up reads it back: the state equals what was written and
    the logits equal a fresh prefill of the whole follow-up (the same arithmetic: exact)."""
    model = tiny_model(seed=0)
    disk = _disk(tmp_path, model)
    pool = _pool(model, disk)
    a, b = _ids(140, seed=1), _ids(40, seed=2)
    with torch.inference_mode():
        slot = _prefill(model, pool, a)
        written = pool.slot_tensors(slot, len(a))
        _prefill(model, pool, b)  # evicts A: written to disk
        disk.flush()
        assert len(disk) == 1 and disk.stats.writes == 1 and pool.stats.evictions == 1
        follow = a + _ids(12, seed=3)
        got, n = _continue(model, pool, follow)
        assert n == len(a) and disk.stats.hits == 1 and pool.stats.hits == 1
        restored = pool.slot_tensors(0, n)  # the continuation's slot, after its prefill
        fresh = model.new_state(1, MAX_LEN, DEVICE)
        want = model(torch.tensor([follow], device=DEVICE), fresh)[0, n:]
    # the entries and indexer keys below A's length are append-only: the continuation left
    # them as read back, so they must equal what was written, bit for bit
    for key, t in written.items():
        if key.endswith(("entries", "index_keys")):
            assert torch.equal(restored[key][: t.shape[0]], t), key
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_restart_finds_the_conversations_the_last_process_held(tmp_path):
    model = tiny_model(seed=0)
    a = _ids(60, seed=4)
    with torch.inference_mode():
        pool = _pool(model, _disk(tmp_path, model), max_seqs=2)
        slot = _prefill(model, pool, a)
        saved = pool.slot_tensors(slot, len(a))
        pool.close()  # cached slots go to disk
        again = _pool(model, _disk(tmp_path, model), max_seqs=2)  # "a restart"
        follow = a + _ids(5, seed=5)
        slot2, n = again.acquire_prefix(follow)
        assert n == len(a)
        restored = again.slot_tensors(slot2, n)
    assert restored.keys() == saved.keys()
    for key in saved:
        assert torch.equal(restored[key].nan_to_num(), saved[key].nan_to_num()), key


def test_the_directory_keeps_to_its_size_limit_dropping_the_least_recently_used(tmp_path):
    model = tiny_model(seed=0)
    with torch.inference_mode():
        probe = _pool(model, None)
        one = sum(t.numel() * t.element_size() for t in probe.slot_tensors(0, 40).values())
        disk = _disk(tmp_path, model, max_bytes=int(2.5 * one))  # room for two files
        pool = _pool(model, disk)
        convs = [_ids(40, seed=10 + i) for i in range(4)]
        for ids in convs:
            _prefill(model, pool, ids)  # each evicts the one before
        disk.flush()
        assert disk.nbytes <= disk.max_bytes and len(disk) == 2 and disk.stats.evictions == 1
        assert pool.acquire_prefix(convs[0] + [1])[1] == 0  # the oldest is gone
        pool.release(0)
        assert disk.lookup(convs[2] + [1]) is not None
    assert len(list(tmp_path.glob("*.safetensors"))) == len(disk)


def test_another_models_files_and_damaged_files_are_never_loaded(tmp_path):
    model = tiny_model(seed=0)
    a = _ids(50, seed=6)
    with torch.inference_mode():
        pool = _pool(model, _disk(tmp_path, model), max_seqs=2)
        _prefill(model, pool, a)
        pool.close()
        # the same files, seen by a bf16 model: another fingerprint, nothing listed
        other = _disk(tmp_path, model, dtype=torch.bfloat16)
        assert len(other) == 0 and other.lookup([*a, 1]) is None
        # a damaged file: dropped at the hit, a miss, the prompt prefills from 0
        (path,) = tmp_path.glob("*.safetensors")
        path.write_bytes(path.read_bytes()[:200])
        disk = _disk(tmp_path, model)
        assert len(disk) == 0 and disk.stats.errors == 1 and not path.exists()
        pool = _pool(model, disk, max_seqs=2)
        assert pool.acquire_prefix([*a, 1])[1] == 0 and pool.stats.misses == 1


def test_a_failed_write_loses_that_entry_only(tmp_path, monkeypatch):
    import engine.kv_disk as kv_disk

    model = tiny_model(seed=0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kv_disk, "save_file", full_disk)
    disk = _disk(tmp_path, model)
    with torch.inference_mode():
        pool = _pool(model, disk)
        a = _ids(40, seed=8)
        _prefill(model, pool, a)
        _prefill(model, pool, _ids(40, seed=9))  # evicts a: the write fails
        disk.flush()
        assert disk.stats.errors == 1 and len(disk) == 0
        assert not list(tmp_path.iterdir())  # no half-written file left
        assert pool.acquire_prefix([*a, 1])[1] == 0  # a miss, served by a full prefill
