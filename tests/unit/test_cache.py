from worker.cache import BoundedLRU


def test_evicts_least_recently_used_by_bytes():
    cache = BoundedLRU(max_bytes=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 4)  # 12 bytes: b goes
    assert cache.get("b") is None and cache.get("c") == "C" and len(cache) == 2
    cache.put("huge", "H", 11)  # bigger than the whole cache: not stored
    assert cache.get("huge") is None
    assert (cache.hits, cache.misses, cache.bytes) == (2, 2, 8)
