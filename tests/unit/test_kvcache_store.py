"""The KV block store: what is kept and what is evicted under the memory limit, LRU and LFU."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

import switchyard.kvcache as kvcache
from switchyard.errors import InvalidRequestError, RequestTooLargeError
from switchyard.kvcache import BlockStore, KVCacheServerConfig, memory_bytes
from switchyard.kvcache.store import ENTRY_OVERHEAD_BYTES

BLOCK = 1000
COST = BLOCK + ENTRY_OVERHEAD_BYTES


def key(i: int) -> str:
    """A valid block key (16 hex digits) for block ``i``."""
    return f"{i:016x}"


def block(i: int, size: int = BLOCK) -> bytes:
    return bytes([i % 256]) * size


def store_of(blocks: int, eviction: kvcache.EvictionPolicy = "lru") -> BlockStore:
    """A store with room for exactly ``blocks`` blocks of ``BLOCK`` bytes."""
    return BlockStore(blocks * COST, eviction=eviction)


def test_put_get_round_trip_counts_hits_and_misses() -> None:
    """A stored block comes back byte for byte; reads of absent keys are misses, not errors."""
    store = store_of(4)
    assert store.put(key(1), block(1)).created
    assert store.get(key(1)) == block(1)
    assert store.get(key(2)) is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.blocks, stats.used_bytes) == (1, 1, 1, 1, COST)


def test_lru_evicts_the_least_recently_used_block() -> None:
    """With room for three blocks, reading block 1 makes block 2 the one a fourth put evicts."""
    store = store_of(3)
    for i in (1, 2, 3):
        store.put(key(i), block(i))
    store.get(key(1))
    result = store.put(key(4), block(4))
    assert result.evicted == (key(2),)
    assert [key(i) in store for i in (1, 2, 3, 4)] == [True, False, True, True]
    assert store.stats().evictions == 1 and store.stats().evicted_bytes == COST


def test_contains_is_a_probe_not_a_use() -> None:
    """Asking whether blocks are held changes neither the LRU order nor the hit counters."""
    store = store_of(2)
    store.put(key(1), block(1))
    store.put(key(2), block(2))
    assert store.contains([key(1), key(3)]) == [True, False]
    store.put(key(3), block(3))
    assert key(1) not in store and key(2) in store
    assert (store.stats().hits, store.stats().misses) == (0, 0)


def test_lfu_evicts_the_least_frequently_used_block() -> None:
    """Block 1 read three times and block 2 once outlive block 3, which was only written; among
    equally used blocks the least recent goes first."""
    store = store_of(3, "lfu")
    for i in (1, 2, 3):
        store.put(key(i), block(i))
    for _ in range(3):
        store.get(key(1))
    store.get(key(2))
    assert store.put(key(4), block(4)).evicted == (key(3),)
    assert store.put(key(5), block(5)).evicted == (key(4),)  # 4 and 5 both used once: 4 is older
    assert [key(i) in store for i in (1, 2, 5)] == [True, True, True]


def test_lfu_refresh_keeps_the_use_count() -> None:
    """Re-putting a hot block is one more use, not a reset to a cold block."""
    store = store_of(2, "lfu")
    store.put(key(1), block(1))
    store.get(key(1))
    store.put(key(2), block(2))
    store.get(key(2))
    store.get(key(2))
    assert not store.put(key(1), block(1)).created  # block 1: 3 uses, block 2: 3 uses, 1 newer
    assert store.put(key(3), block(3)).evicted == (key(2),)


def test_refresh_replaces_the_bytes_and_the_accounting() -> None:
    store = store_of(4)
    store.put(key(1), block(1, 100))
    result = store.put(key(1), block(7, 300))
    assert not result.created and store.get(key(1)) == block(7, 300)
    assert store.stats().used_bytes == 300 + ENTRY_OVERHEAD_BYTES and len(store) == 1


def test_one_large_block_evicts_as_many_as_it_needs() -> None:
    store = store_of(4)
    for i in range(4):
        store.put(key(i), block(i))
    result = store.put(key(9), block(9, 3 * COST - ENTRY_OVERHEAD_BYTES))
    assert result.evicted == (key(0), key(1), key(2))
    assert store.stats().used_bytes == store.capacity_bytes


def test_a_block_larger_than_the_store_is_refused_and_nothing_is_evicted() -> None:
    store = store_of(2)
    store.put(key(1), block(1))
    with pytest.raises(RequestTooLargeError, match="cannot fit"):
        store.put(key(2), block(2, 2 * COST))
    assert key(1) in store and store.stats().evictions == 0


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "0123456789ABCDEF", "0123456789abcdeg", "0123456789abcde", "f" * 129, "../etc/passwd"],
)
def test_invalid_keys_are_rejected_by_every_operation(bad: str) -> None:
    """Keys are 16-128 lowercase hex digits; anything else is the client's error, named as such."""
    store = store_of(2)
    for op in (lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.delete(bad)):
        with pytest.raises(InvalidRequestError, match="invalid block key") as info:
            op()
        assert info.value.param == "key"
    with pytest.raises(InvalidRequestError):
        store.contains([key(1), bad])


def test_empty_blocks_are_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        store_of(2).put(key(1), b"")


def test_delete_frees_the_block_and_its_bytes() -> None:
    store = store_of(2)
    store.put(key(1), block(1))
    assert store.delete(key(1)) and not store.delete(key(1))
    assert store.stats().used_bytes == 0 and store.stats().deletes == 1


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_random_workload_never_exceeds_the_limit(eviction: kvcache.EvictionPolicy) -> None:
    """Under a random mix of puts (varied sizes), gets and deletes, the accounting stays exact:
    used bytes equal the held blocks' cost and never exceed the capacity."""
    rng = random.Random(7)
    store = BlockStore(50_000, eviction=eviction)
    held: dict[str, int] = {}
    for _ in range(5000):
        k = key(rng.randrange(200))
        op = rng.random()
        if op < 0.5:
            size = rng.randrange(1, 8000)
            for gone in store.put(k, block(1, size)).evicted:
                held.pop(gone)
            held[k] = size
        elif op < 0.9:
            got = store.get(k)
            assert (got is None) == (k not in held)
        elif store.delete(k):
            held.pop(k)
        stats = store.stats()
        assert stats.used_bytes == sum(BlockStore.cost(s) for s in held.values()) <= store.capacity_bytes
        assert stats.blocks == len(held)


def test_store_rejects_unusable_settings() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        BlockStore(ENTRY_OVERHEAD_BYTES)
    with pytest.raises(ValueError, match="eviction"):
        BlockStore(10_000, eviction="fifo")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("16Gi", 16 * 2**30), ("512Mi", 512 * 2**20), ("1.5G", 1_500_000_000), ("1000", 1000), ("2k", 2000)],
)
def test_memory_quantities_as_bytes(quantity: str, expected: int) -> None:
    """The CRD's memory quantities (``memoryPerReplica``) mean what Kubernetes means by them."""
    assert memory_bytes(quantity) == expected
    assert KVCacheServerConfig(memory=quantity).memory == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("quantity", ["16GB", "-1Gi", "1e9", "100m", "Gi", ""])
def test_bad_memory_quantities_are_config_errors(quantity: str) -> None:
    with pytest.raises(ValidationError, match="memory"):
        KVCacheServerConfig(memory=quantity)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    """Every promised default of the server configuration, one per field."""
    cfg = KVCacheServerConfig(memory="1Gi")  # type: ignore[arg-type]
    assert cfg.host == "127.0.0.1"
    assert cfg.port == kvcache.DEFAULT_PORT == 9700
    assert cfg.eviction == "lru"
    assert cfg.max_block_bytes == 64 * 2**20
    assert cfg.max_batch_keys == 4096
    assert cfg.shutdown_grace_s == 5.0


def test_public_surface_is_sorted_and_importable() -> None:
    """``switchyard.kvcache.__all__`` is in ruff's RUF022 order (CONSTANTS, Classes, functions)."""

    def order(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)

    assert kvcache.__all__ == sorted(kvcache.__all__, key=order)
    assert all(hasattr(kvcache, name) for name in kvcache.__all__)
