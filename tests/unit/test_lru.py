from zimage_split.common.lru import ByteBoundedLRU


def test_evicts_least_recently_used_by_bytes() -> None:
    cache: ByteBoundedLRU[bytes] = ByteBoundedLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # 12 bytes > 10: evict b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 8
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None
    assert cache.misses == 1


def test_value_larger_than_the_bound_is_not_kept() -> None:
    cache: ByteBoundedLRU[bytes] = ByteBoundedLRU(3, len)
    cache.put("big", b"1234")
    assert len(cache) == 0 and cache.bytes == 0


def test_replacing_a_key_updates_the_size() -> None:
    cache: ByteBoundedLRU[bytes] = ByteBoundedLRU(10, len)
    cache.put("a", b"12345678")
    cache.put("a", b"12")
    assert cache.bytes == 2 and len(cache) == 1
