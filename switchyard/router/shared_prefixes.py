"""Which prompt prefixes are shared by much of the traffic: where a routing key must not stop.

Why. A cache-affinity key hashed over the first few blocks of a prompt names the system
prompt when every request starts with one: every request then gets the same two candidate
instances, and affinity routing collapses into its fallback. Production traffic almost always
starts with such a head (a system prompt, a tool preamble, one application's template), and
often with several of different popularity. The prefix that identifies *a conversation or a
document* starts where the popular heads end.

What is learned. For each prefix a router sees (a chunk fingerprint of ``prefix_hash``: the
prompt up to one of the chunk ends), a decayed count of the requests that passed through it
and up to ``fanout`` distinct next chunks they continued with. A prefix is a **shared branch
point** when both hold:

* its share of the recent traffic is at least ``min_share`` (and its decayed count at least
  ``min_count``, so a cold router does not call everything shared);
* requests continued from it in at least ``fanout`` different ways.

A conversation's prefix continues one way (every turn extends the previous one), a system
prompt in as many ways as there are conversations behind it, and the levels *inside* a head
continue one way too, up to the head's last chunk, which branches. The routing key is the
prefix one chunk past the deepest shared branch point on the request's path
(:meth:`SharedPrefixes.key_level`): past every popular head, at the start of what is the
request's own. Popular heads are then cached on every instance that serves their
conversations (they are the most reused prefix of all), while each conversation stays on its
two ring candidates. A prefix below ``min_share`` keeps its requests together, so a document
or application that two instances can carry stays co-located.

Why every router replica agrees without shared state: the rule is deterministic and every
replica learns from its own (random) share of the same traffic, so a head that carries a
large share is a branch point everywhere within the first dozens of requests; replicas can
disagree only about prefixes near the threshold, and only while they warm up. The routing
benchmark measures the agreement (``--routers``).

Cost: counts only fall along a path (every request through a prefix passed its parent), so
reading stops at the first prefix below the popularity floor, and learning (from
``on_dispatched``) stops one level past it: a few dict operations per request, plus an
occasional pruning pass (amortised O(1)). A prefix starts being counted once its parent is
popular, so a new head is learned one level per few dozen requests. Levels deeper than
``depth`` (the policy's ``shared_max_tokens``) are neither read nor learned.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["SharedPrefixes"]

_RENORMALISE_AT = 1e12  # the growing weight is folded back into the counts past this


class SharedPrefixes:
    """Decayed popularity and fan-out of prompt prefixes (chunk fingerprints)."""

    __slots__ = ("_capacity", "_children", "_counts", "_fanout", "_growth", "_min_count", "_total", "_weight")

    def __init__(
        self, *, half_life: int = 4096, fanout: int = 4, min_count: float = 8.0, capacity: int = 1 << 16
    ) -> None:
        """``half_life``: requests after which an observation weighs half; ``capacity``: prefixes
        remembered (the least counted are forgotten first)."""
        if half_life < 1 or fanout < 2 or capacity < 1:
            raise ValueError("half_life and capacity must be positive and fanout at least 2")
        self._growth = 2.0 ** (1.0 / half_life)
        self._weight = 1.0  # what one observation adds now; grows instead of decaying every count
        self._total = 0.0
        self._counts: dict[int, float] = {}
        self._children: dict[int, set[int]] = {}
        self._fanout = fanout
        self._min_count = min_count
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._counts)

    def is_branch_point(self, fingerprint: int, min_share: float) -> bool:
        """Whether ``fingerprint`` is a shared branch point (module docstring)."""
        count = self._counts.get(fingerprint)
        if count is None or count < self._min_count * self._weight or count < min_share * self._total:
            return False
        children = self._children.get(fingerprint)
        return children is not None and len(children) >= self._fanout

    def key_level(self, fingerprints: Sequence[int], min_share: float, *, depth: int) -> int:
        """The index of the routing key's chunk: one past the deepest shared branch point among
        the first ``depth`` fingerprints, and never before ``0``; ``len(fingerprints)`` when the
        request ends at (or inside) a shared prefix and has no chunk of its own."""
        deepest = -1
        counts, children = self._counts, self._children
        floor = self._floor(min_share)
        fanout = self._fanout
        for j in range(min(depth, len(fingerprints))):
            f = fingerprints[j]
            count = counts.get(f)
            if count is None or count < floor:
                break  # counts only fall along a path: nothing deeper is popular either
            kids = children.get(f)
            if kids is not None and len(kids) >= fanout:
                deepest = j
        return deepest + 1

    def _floor(self, min_share: float) -> float:
        return max(self._min_count * self._weight, min_share * self._total)

    def observe(self, fingerprints: Sequence[int], min_share: float, *, depth: int) -> None:
        """Count one request through its prefixes, down to the first one below the popularity
        floor (``min_share``, as :meth:`key_level` reads), and the way it continued from each."""
        w = self._weight
        counts, children, fanout = self._counts, self._children, self._fanout
        floor = self._floor(min_share)
        n = min(depth, len(fingerprints))
        for j in range(n):
            f = fingerprints[j]
            count = counts.get(f, 0.0) + w
            counts[f] = count
            if j + 1 < len(fingerprints):
                kids = children.get(f)
                if kids is None:
                    children[f] = {fingerprints[j + 1]}
                elif len(kids) < fanout:
                    kids.add(fingerprints[j + 1])
            if count < floor:
                break
        self._total += w
        self._weight = w * self._growth
        if self._weight > _RENORMALISE_AT:
            self._renormalise()
        if len(counts) > 2 * self._capacity:
            self._prune()

    def _renormalise(self) -> None:
        w = self._weight
        self._counts = {f: c / w for f, c in self._counts.items()}
        self._total /= w
        self._weight = 1.0

    def _prune(self) -> None:
        """Keep the ``capacity`` most counted prefixes (O(n log capacity), every ``capacity`` inserts)."""
        keep = heapq.nlargest(self._capacity, self._counts.items(), key=lambda kv: kv[1])
        self._counts = dict(keep)
        self._children = {f: kids for f, kids in self._children.items() if f in self._counts}
