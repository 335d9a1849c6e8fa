"""A bounded in-memory store of opaque KV blocks keyed by chain hash, with LRU or LFU eviction.

Why a store apart from the server: what is kept and what goes when memory runs out is the part
worth testing exhaustively, without sockets; the HTTP server (``server.py``) only parses,
validates sizes and calls these methods. It is synchronous and unlocked on purpose: the server
runs it on one event loop and every operation is a few dict moves, so a lock would only add
cost.

Keys are the engines' block hashes as lowercase hex (vLLM's SHA-256 chain hash is 64 digits; the
64-bit form KV events publish is 16). Blocks are content-addressed: a key names one block's
KV for one model and layout, so a second ``put`` of a key is a refresh, not a conflict, and
the store never interprets the bytes.

Memory accounting. Each block costs its payload plus ``ENTRY_OVERHEAD_BYTES`` (the key string,
the ``bytes`` header and the ordering structures' nodes, measured at ~200 bytes in CPython 3.11
and rounded up), so a flood of tiny blocks cannot exceed the limit either. ``used_bytes`` never
exceeds ``capacity_bytes``: a put evicts first, and a block that could not fit into an empty
store is refused.

Eviction. ``lru`` drops the least recently read or written block. ``lfu`` drops the block read
or written the fewest times, the least recently used among equals (O(1): blocks are bucketed by
use count). LFU has no ageing: a block that was hot once stays until colder blocks are gone,
which suits shared system prompts and is wrong for a workload whose hot set drifts; use
``lru`` there.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from switchyard.errors import InvalidRequestError, RequestTooLargeError

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "KEY_PATTERN",
    "BlockStore",
    "EvictionPolicy",
    "PutResult",
    "StoreStats",
    "check_key",
]

EvictionPolicy = Literal["lru", "lfu"]

ENTRY_OVERHEAD_BYTES = 256
"""Bytes charged per block on top of its payload (see the module docstring)."""

KEY_PATTERN = re.compile(r"[0-9a-f]{16,128}")
"""A block key: 16 to 128 lowercase hex digits (a 64-bit to 512-bit hash)."""


def check_key(key: str) -> str:
    """``key`` if it is a valid block key, else ``InvalidRequestError`` saying what a key is."""
    if KEY_PATTERN.fullmatch(key) is None:
        shown = key if len(key) <= 40 else key[:37] + "..."
        raise InvalidRequestError(
            f"invalid block key {shown!r}: expected 16 to 128 lowercase hex digits (the block's chain hash)",
            param="key",
        )
    return key


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a ``put`` did: whether the key is new and which keys it evicted to make room."""

    created: bool
    evicted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters since start and the current occupancy (what ``/v1/stats`` and ``/metrics`` show)."""

    eviction_policy: EvictionPolicy
    capacity_bytes: int
    used_bytes: int
    """Payload plus per-block overhead of the blocks held now."""
    blocks: int
    hits: int
    """Reads (``get``) that found their block."""
    misses: int
    """Reads that did not."""
    puts: int
    evictions: int
    evicted_bytes: int
    deletes: int


class _LfuOrder:
    """Keys bucketed by use count; each bucket in least-recently-used order. All moves O(1)."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._buckets: dict[int, OrderedDict[str, None]] = {}
        self._min = 0

    def _unlink(self, key: str) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def _link(self, key: str, count: int) -> None:
        self._count[key] = count
        self._buckets.setdefault(count, OrderedDict())[key] = None

    def uses(self, key: str) -> int:
        return self._count[key]

    def add(self, key: str, count: int = 1) -> None:
        self._link(key, count)
        if count < self._min or self._min not in self._buckets:
            self._min = count

    def touch(self, key: str) -> None:
        count = self._unlink(key)
        self._link(key, count + 1)
        if count == self._min and count not in self._buckets:
            self._min = count + 1

    def remove(self, key: str) -> None:
        self._unlink(key)
        if self._buckets and self._min not in self._buckets:
            self._min = min(self._buckets)

    def victim(self) -> str:
        return next(iter(self._buckets[self._min]))


class BlockStore:
    """KV blocks by key within ``capacity_bytes``; see the module docstring for the rules."""

    def __init__(self, capacity_bytes: int, *, eviction: EvictionPolicy = "lru") -> None:
        if capacity_bytes <= ENTRY_OVERHEAD_BYTES:
            raise ValueError(f"capacity_bytes must exceed {ENTRY_OVERHEAD_BYTES}, got {capacity_bytes}")
        if eviction not in ("lru", "lfu"):
            raise ValueError(f"unknown eviction policy {eviction!r} (known: lfu, lru)")
        self.capacity_bytes = capacity_bytes
        self.eviction: EvictionPolicy = eviction
        # LRU order lives in the OrderedDict itself (oldest first); LFU keeps its own buckets.
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._lfu = _LfuOrder() if eviction == "lfu" else None
        self._used = 0
        self._hits = self._misses = self._puts = 0
        self._evictions = self._evicted_bytes = self._deletes = 0

    @staticmethod
    def cost(payload_bytes: int) -> int:
        """Bytes one block of ``payload_bytes`` is charged."""
        return payload_bytes + ENTRY_OVERHEAD_BYTES

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def _touch(self, key: str) -> None:
        if self._lfu is None:
            self._blocks.move_to_end(key)
        else:
            self._lfu.touch(key)

    def _drop(self, key: str) -> int:
        payload = self._blocks.pop(key)
        if self._lfu is not None:
            self._lfu.remove(key)
        freed = self.cost(len(payload))
        self._used -= freed
        return freed

    def _victim(self) -> str:
        return next(iter(self._blocks)) if self._lfu is None else self._lfu.victim()

    def put(self, key: str, payload: bytes) -> PutResult:
        """Store ``payload`` under ``key``, evicting as needed; refresh the block if it exists.

        Raises ``InvalidRequestError`` for a bad key or an empty payload and
        ``RequestTooLargeError`` for a block that cannot fit even into an empty store; the store
        is unchanged then.
        """
        check_key(key)
        if not payload:
            raise InvalidRequestError("a block must not be empty", param="body")
        cost = self.cost(len(payload))
        if cost > self.capacity_bytes:
            raise RequestTooLargeError(
                f"block of {len(payload)} bytes cannot fit: the store holds {self.capacity_bytes} bytes "
                f"including {ENTRY_OVERHEAD_BYTES} bytes of overhead per block",
                param="body",
            )
        created = key not in self._blocks
        uses = 0
        if not created:  # a refresh: re-inserted below as the most recent use, one use more
            uses = self._lfu.uses(key) if self._lfu is not None else 0
            self._drop(key)
        evicted: list[str] = []
        while self._used + cost > self.capacity_bytes:
            victim = self._victim()
            self._evicted_bytes += self._drop(victim)
            evicted.append(victim)
        self._blocks[key] = payload
        if self._lfu is not None:
            self._lfu.add(key, uses + 1)
        self._used += cost
        self._puts += 1
        self._evictions += len(evicted)
        return PutResult(created=created, evicted=tuple(evicted))

    def get(self, key: str) -> bytes | None:
        """The block's bytes (counted as a use and a hit), or None (a miss)."""
        check_key(key)
        payload = self._blocks.get(key)
        if payload is None:
            self._misses += 1
            return None
        self._hits += 1
        self._touch(key)
        return payload

    def contains(self, keys: list[str]) -> list[bool]:
        """Whether each key is held. A probe, not a use: order and hit counters are unchanged."""
        for key in keys:
            check_key(key)
        return [key in self._blocks for key in keys]

    def delete(self, key: str) -> bool:
        """Remove the block; False when it was not held."""
        check_key(key)
        if key not in self._blocks:
            return False
        self._drop(key)
        self._deletes += 1
        return True

    def stats(self) -> StoreStats:
        return StoreStats(
            eviction_policy=self.eviction,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self._used,
            blocks=len(self._blocks),
            hits=self._hits,
            misses=self._misses,
            puts=self._puts,
            evictions=self._evictions,
            evicted_bytes=self._evicted_bytes,
            deletes=self._deletes,
        )
