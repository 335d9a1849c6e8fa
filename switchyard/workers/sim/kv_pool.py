"""Paged KV blocks with a prefix cache, as the simulator models one vLLM V1 instance's KV memory.

Kept apart from the scheduler in ``sim.instance`` because it is the one piece whose behaviour
must match vLLM's block manager exactly (hit, allocate, evict order), and it is tested on its
own terms.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

__all__ = ["KvBlockPool"]


class KvBlockPool:
    """Paged KV blocks with a prefix cache over chained block hashes and an LRU free queue.

    Free blocks sit in one queue, least recently freed first (vLLM's ``FreeKVCacheBlockQueue``);
    a free block keeps its hash, so it can still be hit until it is handed out again, which is
    what evicts it. All operations are O(blocks touched).
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash, in use or free."""
        return len(self._cached)

    def lookup(self, hashes: list[int], limit: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes[:limit]``."""
        hit: list[int] = []
        for h in itertools.islice(hashes, limit):
            block = self._cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def allocate(self, blocks: list[int], hit: list[int], num_new: int) -> bool:
        """Append ``hit`` (taking a reference) and ``num_new`` fresh blocks to ``blocks``, or do nothing."""
        ref, free = self._ref, self._free
        if num_new > len(free) - sum(1 for b in hit if ref[b] == 0):
            return False
        for b in hit:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1
            blocks.append(b)
        for _ in range(num_new):
            b, _none = free.popitem(last=False)
            h = self._hash[b]
            if h is not None:  # evict: the least recently freed cached block goes first
                self._hash[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
            ref[b] = 1
            blocks.append(b)
        return True

    def register(self, block: int, block_hash: int) -> None:
        """Publish a full, computed block; a hash already cached keeps its first block."""
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            self._hash[block] = block_hash

    def release(self, blocks: list[int]) -> None:
        """Drop one reference per block; tail blocks enter the free queue first (evicted first)."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def land(self, hashes: list[int]) -> int | None:
        """Cache blocks computed elsewhere (a migration's pre-copy) under ``hashes``, as free blocks.

        The leading ones already cached are kept (and moved to the recent end of the free
        queue); the rest take free blocks, evicting the oldest cached ones. Returns how many
        blocks were written, None (nothing changed) when too few blocks are free.
        """
        hit = self.lookup(hashes, len(hashes))
        blocks: list[int] = []
        if not self.allocate(blocks, hit, len(hashes) - len(hit)):
            return None
        for b in range(len(hit), len(hashes)):
            self.register(blocks[b], hashes[b])
        self.release(blocks)
        return len(hashes) - len(hit)
