"""``consistent_hash``: one hash ring over the prefix key, no load awareness at all.

The pure cache-affinity baseline: every request whose first ``prefix_blocks`` blocks match
goes to the same instance (the owner of its vLLM-equal key on one consistent-hash ring), so
its prefix cache hit rate is the best any placement can get, and a popular prefix becomes a
hotspot that nothing relieves. DualMap is this plus a second ring, a TTFT comparison and an
SLO fallback; comparing the two shows what those buy. When the owner is not live the walk
goes on clockwise to the next live instance, as consistent hashing does on removal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from switchyard.messages import InstanceInfo, RoutingRequest
from switchyard.router.dual_ring import DEFAULT_VIRTUAL_NODES, HashRing
from switchyard.router.policies import register_policy
from switchyard.router.policies.base import Clock, PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.prefix_hash import PromptHasher
from switchyard.router.registry import FleetView

__all__ = ["ConsistentHashParams", "ConsistentHashPolicy"]


class ConsistentHashParams(PolicyParams):
    """Parameters of ``consistent_hash`` (the same meaning as ``dualmap``'s)."""

    prefix_blocks: int = Field(default=4, ge=1, le=1024)
    """Blocks hashed into the routing key."""
    virtual_nodes: int = Field(default=DEFAULT_VIRTUAL_NODES, ge=1, le=10_000)
    """Points per instance on the ring."""
    ring_seed: int = Field(default=0x6475_616C_3031, ge=0, lt=1 << 64)
    """Seed of the ring (the default equals ``dualmap``'s first ring)."""
    hash_algo: Literal["sha256", "sha256_cbor"] = "sha256"
    """The engines' ``prefix_caching_hash_algo``."""
    hash_seed: str | None = None
    """The engines' ``NONE_HASH`` seed; None is vLLM's default."""


@register_policy("consistent_hash")
class ConsistentHashPolicy(PolicyBase):
    """One ring per model; a lookup is one key hash plus a bisect."""

    Params = ConsistentHashParams

    def __init__(self, params: PolicyParams, *, clock: Clock) -> None:
        super().__init__(params, clock=clock)
        p = params if isinstance(params, ConsistentHashParams) else ConsistentHashParams()
        self._p = p
        self._hasher = PromptHasher(prefix_blocks=p.prefix_blocks, algo=p.hash_algo, seed=p.hash_seed)
        self._rings: dict[str, HashRing] = {}
        self._synced: dict[str, FleetView] = {}  # model -> the fleet view last checked against its ring

    def _ring(self, model: str) -> HashRing:
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = HashRing(seed=self._p.ring_seed, virtual_nodes=self._p.virtual_nodes)
        return ring

    def on_membership(self, instances: Sequence[InstanceInfo]) -> None:
        wanted: dict[str, set[str]] = {}
        for info in instances:
            wanted.setdefault(info.model, set()).add(info.instance_id)
        for model in list(self._rings):
            if model not in wanted:
                del self._rings[model]
        for model, ids in wanted.items():
            ring = self._ring(model)
            for iid in sorted(ring.instances - ids):
                ring.remove(iid)
            for iid in sorted(ids - ring.instances):
                ring.add(iid)
        self._synced.clear()

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        ring = self._ring(fleet.model)
        if self._synced.get(fleet.model) is not fleet:  # instances never announced by on_membership
            for s in fleet.instances:
                if s.info.instance_id not in ring:
                    ring.add(s.info.instance_id)
            self._synced[fleet.model] = fleet
        key = self._hasher.hasher(fleet.instances[0].info.block_size).prefix_key(
            req.prompt_token_ids, self._p.prefix_blocks
        )
        get = fleet.get
        owner = ring.lookup(key, lambda iid: get(iid) is not None)
        assert owner is not None, "the core never asks with an empty fleet"
        return RoutingDecision(owner, RoutingOutcome.AFFINITY, (owner,), reason="owner of the prefix key")
