"""dsml.lru.SizedLRU: the bounded cache under the request-path caches."""

from __future__ import annotations

import threading

from dsml.lru import SizedLRU


def test_bounded_by_entries_least_recently_used_first() -> None:
    cache: SizedLRU[str, int] = SizedLRU(max_entries=3, max_size=1_000)
    for k in "abc":
        cache.put(k, ord(k), 1)
    assert cache.get("a") == ord("a")  # now the most recently used
    cache.put("d", 0, 1)
    assert cache.oldest_first() == ["c", "a", "d"]
    assert cache.get("b") is None and len(cache) == 3 and cache.size == 3


def test_bounded_by_size_and_oversized_entries_are_not_kept() -> None:
    cache: SizedLRU[int, str] = SizedLRU(max_entries=100, max_size=100)
    for k in range(30):
        cache.put(k, "v", 20)
    assert len(cache) == 5 and cache.size == 100 and cache.oldest_first() == [25, 26, 27, 28, 29]
    cache.put(99, "big", 101)
    assert cache.get(99) is None and cache.size == 100


def test_zero_entries_keeps_nothing_and_clear_empties() -> None:
    off: SizedLRU[str, int] = SizedLRU(max_entries=0, max_size=100)
    off.put("a", 1, 1)
    assert off.get("a") is None and len(off) == 0
    cache: SizedLRU[str, int] = SizedLRU(max_entries=10, max_size=100)
    cache.put("a", 1, 5)
    cache.put("a", 2, 5)  # a key already there keeps its first value
    assert cache.get("a") == 1 and cache.size == 5
    cache.clear()
    assert len(cache) == 0 and cache.size == 0


def test_threads_keep_the_bounds() -> None:
    cache: SizedLRU[int, int] = SizedLRU(max_entries=50, max_size=400)

    def work(base: int) -> None:
        for k in range(2_000):
            cache.put(base + k, k, k % 13)
            cache.get(base + k // 2)

    threads = [threading.Thread(target=work, args=(n * 10_000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 50 and cache.size <= 400
    assert cache.size == sum(k % 13 for k in (key % 10_000 for key in cache.oldest_first()))


def test_replace_resizes_an_entry_and_keeps_the_bounds() -> None:
    cache: SizedLRU[str, str] = SizedLRU(max_entries=10, max_size=10)
    for key in "abc":
        cache.put(key, key, 3)
    cache.replace("a", "A", 4)  # grows by 1: 10, within the bound, and now the most recent
    assert cache.get("a") == "A" and cache.size == 10 and cache.oldest_first()[-1] == "a"
    cache.replace("b", "B", 5)  # 12 > 10: the least recent other entry ("c") goes
    assert cache.oldest_first() == ["a", "b"] and cache.size == 9
    cache.replace("gone", "x", 1)  # no entry: nothing kept
    assert cache.get("gone") is None and cache.size == 9
