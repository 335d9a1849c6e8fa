"""Consistent-hash rings: one (``HashRing``) for ``consistent_hash``, two (``DualRing``) for DualMap.

Why rings rather than ``hash(key) % n``: when an instance joins or leaves, a ring moves only
the keys of the ring segments next to that instance's points (about 1/N of them), so the
prefix caches the fleet has built stay useful while it scales. Each instance owns
``virtual_nodes`` points, which evens out the segment lengths (relative spread of an
instance's share is roughly ``1/sqrt(virtual_nodes)``).

Why two rings with independent seeds (DualMap, ``shared/DESIGN.md`` §3): every key gets two
candidate instances that are independent of each other, so the router can apply the power
of two choices while requests that share a prefix keep landing on the same two instances.
If ring 2 maps a key to ring 1's instance, the lookup walks ring 2 on to the next distinct
instance, so the candidates always differ when two or more instances are alive.

Determinism across router replicas: a point's position depends only on (seed, instance id,
point index) through BLAKE2b, and position ties are broken by instance id, so the same
membership gives the same rings whatever order instances were added in and whatever the
process's ``PYTHONHASHSEED``. Lookups are one BLAKE2b of the key plus a ``bisect`` over the
sorted points (O(log V)); adding or removing an instance costs O(V) list work, which only
membership changes pay.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable

__all__ = ["DEFAULT_VIRTUAL_NODES", "DualRing", "HashRing"]

DEFAULT_VIRTUAL_NODES = 160
"""Points per instance: ketama's classic choice; shares stay within ~±10% of 1/N."""

Alive = Callable[[str], bool]


def _seed_key(seed: int) -> bytes:
    return seed.to_bytes(8, "big", signed=False)


class HashRing:
    """One consistent-hash ring of instance ids with ``virtual_nodes`` points each."""

    __slots__ = ("_blake", "_members", "_owners", "_points", "seed", "virtual_nodes")

    def __init__(
        self, *, seed: int = 0, virtual_nodes: int = DEFAULT_VIRTUAL_NODES, instances: Iterable[str] = ()
    ) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be positive, got {virtual_nodes}")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must fit in 64 unsigned bits, got {seed}")
        self.seed = seed
        self.virtual_nodes = virtual_nodes
        # Copying a keyed hasher skips the keyword parsing and the key block of a new one.
        self._blake = hashlib.blake2b(digest_size=8, key=_seed_key(seed))
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members: set[str] = set()
        self.update(add=instances)

    def __repr__(self) -> str:
        return f"HashRing(seed={self.seed}, virtual_nodes={self.virtual_nodes}, {sorted(self._members)})"

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._members

    @property
    def instances(self) -> frozenset[str]:
        return frozenset(self._members)

    def position(self, key: bytes) -> int:
        """Where ``key`` falls on this ring: 64 bits of BLAKE2b keyed with the ring's seed."""
        h = self._blake.copy()
        h.update(key)
        return int.from_bytes(h.digest(), "big")

    def _instance_points(self, instance_id: str) -> list[int]:
        raw = instance_id.encode("utf-8")
        return [self.position(b"%s#%d" % (raw, i)) for i in range(self.virtual_nodes)]

    def add(self, instance_id: str) -> None:
        """Give ``instance_id`` its points; only keys in the segments they split move to it."""
        self.update(add=(instance_id,))

    def remove(self, instance_id: str) -> None:
        """Drop ``instance_id``'s points; its keys move to the next points clockwise."""
        self.update(remove=(instance_id,))

    def update(self, *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        """Add and drop many instances at once: one merge and sort instead of one list insert
        per point (a fresh 1,024-instance ring: ~0.5 s instead of ~15 s). The result is the
        same ring as adding and removing them one by one ((point, owner) order)."""
        gone = set(remove) & self._members
        new = set(add) - self._members - gone
        if not gone and not new:
            return
        self._members -= gone
        self._members |= new
        if gone:
            keep = [i for i, o in enumerate(self._owners) if o not in gone]
            self._points = [self._points[i] for i in keep]
            self._owners = [self._owners[i] for i in keep]
        if len(new) <= 2:  # a join: a bisect insert per point beats re-sorting the ring
            for iid in sorted(new):
                self._insert(iid)
            return
        pairs = list(zip(self._points, self._owners, strict=True))
        for iid in new:
            pairs.extend((p, iid) for p in self._instance_points(iid))
        pairs.sort()
        self._points = [p for p, _ in pairs]
        self._owners = [o for _, o in pairs]

    def _insert(self, instance_id: str) -> None:
        points, owners = self._points, self._owners
        for p in self._instance_points(instance_id):
            # (point, owner) order makes a position tie independent of insertion order.
            i = bisect.bisect_left(points, p)
            while i < len(points) and points[i] == p and owners[i] < instance_id:
                i += 1
            points.insert(i, p)
            owners.insert(i, instance_id)

    def lookup(self, key: bytes, alive: Alive | None = None, *, exclude: str | None = None) -> str | None:
        """The owner of ``key``: the first point clockwise whose instance is alive and not ``exclude``.

        None only when no instance qualifies. The walk is one step in the common case.
        """
        owners = self._owners
        n = len(owners)
        if not n:
            return None
        start = bisect.bisect_right(self._points, self.position(key))
        if start == n:
            start = 0
        owner = owners[start]
        if owner != exclude and (alive is None or alive(owner)):
            return owner  # the common case: no walk
        for step in range(1, n):
            owner = owners[(start + step) % n]
            if owner != exclude and (alive is None or alive(owner)):
                return owner
        return None


class DualRing:
    """Two rings with independent seeds: ``candidates(key)`` gives DualMap's two instances."""

    __slots__ = ("ring1", "ring2")

    def __init__(
        self,
        *,
        seeds: tuple[int, int] = (0x6475_616C_3031, 0x6475_616C_3032),
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        instances: Iterable[str] = (),
    ) -> None:
        if seeds[0] == seeds[1]:
            raise ValueError("the two rings need different seeds, or they would agree on every key")
        members = sorted(set(instances))
        self.ring1 = HashRing(seed=seeds[0], virtual_nodes=virtual_nodes, instances=members)
        self.ring2 = HashRing(seed=seeds[1], virtual_nodes=virtual_nodes, instances=members)

    def __repr__(self) -> str:
        return f"DualRing(seeds=({self.ring1.seed}, {self.ring2.seed}), {sorted(self.instances)})"

    def __len__(self) -> int:
        return len(self.ring1)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self.ring1

    @property
    def instances(self) -> frozenset[str]:
        return self.ring1.instances

    def add(self, instance_id: str) -> None:
        self.ring1.add(instance_id)
        self.ring2.add(instance_id)

    def remove(self, instance_id: str) -> None:
        self.ring1.remove(instance_id)
        self.ring2.remove(instance_id)

    def sync(self, instance_ids: Iterable[str]) -> bool:
        """Make the membership exactly ``instance_ids``; True if anything changed."""
        wanted = set(instance_ids)
        current = self.ring1.instances
        for ring in (self.ring1, self.ring2):
            ring.update(add=wanted - current, remove=current - wanted)
        return wanted != current

    def candidates(self, key: bytes, alive: Alive | None = None) -> tuple[str, str]:
        """``(c1, c2)``: ring 1's owner of ``key`` and ring 2's next distinct owner.

        Instances for which ``alive`` is false are skipped on both rings. ``c2 == c1`` only
        when a single instance qualifies. Raises ``LookupError`` when none does.
        """
        c1 = self.ring1.lookup(key, alive)
        if c1 is None:
            raise LookupError("no live instance on the ring")
        c2 = self.ring2.lookup(key, alive, exclude=c1)
        return c1, c1 if c2 is None else c2
