"""``prefix_tree``: SGLang-router-style cache-aware routing over an approximate prefix tree.

The baseline DualMap is measured against on its own ground. SGLang's router keeps, per
worker, an approximate radix tree of the prompts it sent there (never asking the engines)
and routes each request to the worker with the longest match, unless the fleet is out of
balance, in which case it takes the shortest queue. Here the tree is over chained chunk
fingerprints (``prefix_hash.chunk_fingerprints``): a fingerprint names a whole prefix, so
the radix tree collapses into one dict from fingerprint to the instances that hold it, and
a match walks it from the root until a chunk is missing.

Per request:

1. **Imbalanced** (``max - min`` queue over ``balance_abs_threshold`` *and* ``max`` over
   ``balance_rel_threshold * min``): the shortest queue (outcome ``load``).
2. **Good match** (matched tokens over ``cache_threshold`` of the prompt): the instance with
   the longest match, the shorter queue among equals (outcome ``affinity``).
3. Otherwise the instance with the smallest tree, i.e. the most room for a new prefix.

Memory is bounded by ``max_tree_chunks`` nodes, evicted least recently routed first; a
prompt's nodes are touched deepest first, so leaves go before their prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from switchyard.messages import InstanceInfo, RoutingRequest
from switchyard.router.policies import register_policy
from switchyard.router.policies.base import Clock, PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.prefix_hash import PromptHasher
from switchyard.router.registry import FleetView, InstanceState

__all__ = ["PrefixTreeParams", "PrefixTreePolicy"]

_REASON_IMBALANCE = "load out of balance: shortest queue"
_REASON_ROOM = "no good match: smallest tree"


class PrefixTreeParams(PolicyParams):
    """Parameters of ``prefix_tree``."""

    cache_threshold: float = Field(default=0.5, ge=0, le=1)
    """Least matched fraction of the prompt for the match to decide."""
    balance_abs_threshold: int = Field(default=32, ge=0)
    """Queue-length gap (requests) above which, with the relative one, load decides."""
    balance_rel_threshold: float = Field(default=1.5, ge=1)
    """Ratio of the longest to the shortest queue above which, with the absolute gap, load decides."""
    chunk_blocks: int = Field(default=32, ge=1, le=1024)
    """Largest tree node, in blocks (nodes double from one block up to it)."""
    sample_stride: int = Field(default=16, ge=1, le=64)
    """Fingerprint every n-th token of a chunk (1 = exact)."""
    max_tree_chunks: int = Field(default=1 << 20, ge=1)
    """Nodes kept across all instances before the least recently routed are evicted."""


@register_policy("prefix_tree")
class PrefixTreePolicy(PolicyBase):
    """Longest routed prefix wins, unless load is out of balance. O(prompt chunks + instances)."""

    Params = PrefixTreeParams
    reads = frozenset({"num_running", "num_waiting"})

    def __init__(self, params: PolicyParams, *, clock: Clock) -> None:
        super().__init__(params, clock=clock)
        p = params if isinstance(params, PrefixTreeParams) else PrefixTreeParams()
        self._p = p
        # Only the chunk fingerprints are used: no ring key (prefix_blocks=0 skips its SHA-256).
        self._hasher = PromptHasher(
            prefix_blocks=0, chunk_blocks=p.chunk_blocks, sample_stride=p.sample_stride
        )
        self._tree: OrderedDict[int, dict[str, None]] = OrderedDict()
        self._size: dict[str, int] = {}  # nodes per instance
        self._block_size: dict[str, int] = {}

    def on_membership(self, instances: Sequence[InstanceInfo]) -> None:
        new = {i.instance_id: i.block_size for i in instances}
        gone = set(self._size) - set(new)
        if gone:  # rare: one pass over the tree
            for f, holders in list(self._tree.items()):
                for iid in gone & holders.keys():
                    del holders[iid]
                if not holders:
                    del self._tree[f]
            for iid in gone:
                del self._size[iid]
        self._block_size = new

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        p = self._p
        instances = fleet.instances
        lightest = min(instances, key=_queue_then_id)
        heaviest = max(s.queue_length for s in instances)
        light = lightest.queue_length
        if heaviest - light > p.balance_abs_threshold and heaviest > p.balance_rel_threshold * light:
            return RoutingDecision(lightest.info.instance_id, RoutingOutcome.LOAD, reason=_REASON_IMBALANCE)
        d = self._hasher.digest(req, instances[0].info.block_size)
        holders: list[InstanceState] = []
        depth = 0
        tree, get = self._tree, fleet.get
        for f in d.fingerprints:
            node = tree.get(f)
            if node is None:
                break
            deeper = [s for iid in node if (s := get(iid)) is not None and (not depth or s in holders)]
            if not deeper:
                break
            holders, depth = deeper, depth + 1
        matched = d.cached_tokens(depth)
        if holders and matched > p.cache_threshold * d.num_tokens:
            best = min(holders, key=_queue_then_id)
            return RoutingDecision(
                best.info.instance_id,
                RoutingOutcome.AFFINITY,
                tuple(s.info.instance_id for s in holders),
                ((best.info.instance_id, float(matched)),),
                "longest routed prefix",
            )
        size = self._size
        roomiest = min(instances, key=lambda s: (size.get(s.info.instance_id, 0), *_queue_then_id(s)))
        return RoutingDecision(roomiest.info.instance_id, RoutingOutcome.LOAD, reason=_REASON_ROOM)

    def on_dispatched(self, req: RoutingRequest, decision: RoutingDecision) -> None:
        iid = decision.instance_id
        d = self._hasher.last(req) or self._hasher.digest(req, self._block_size.get(iid, 32))
        self._hasher.release(req)
        tree, size = self._tree, self._size
        added = 0
        for f in reversed(d.fingerprints):
            node = tree.get(f)
            if node is None:
                node = tree[f] = {}
            else:
                tree.move_to_end(f)
            if iid not in node:
                node[iid] = None
                added += 1
        size[iid] = size.get(iid, 0) + added
        while len(tree) > self._p.max_tree_chunks:
            _, evicted = tree.popitem(last=False)
            for holder in evicted:
                size[holder] -= 1


def _queue_then_id(s: InstanceState) -> tuple[int, str]:
    return s.queue_length, s.info.instance_id
