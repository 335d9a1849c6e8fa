"""``least_load``: the instance with the fewest requests on it, counting the router's own.

The load-aware baseline (what most production routers do). Queue length is the reported
running + waiting requests plus those this router dispatched since the last report, so a burst
between two reports spreads out instead of piling onto the instance that looked idle. Ties
go to the instance with fewer prompt tokens waiting for prefill, then to the lowest id, which
keeps the choice deterministic.
"""

from __future__ import annotations

from switchyard.messages import RoutingRequest
from switchyard.router.policies import register_policy
from switchyard.router.policies.base import Clock, PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.registry import FleetView, InstanceState

__all__ = ["LeastLoadParams", "LeastLoadPolicy"]


class LeastLoadParams(PolicyParams):
    """Parameters of ``least_load``."""

    count_pending: bool = True
    """Add requests dispatched since the last load report; off only to measure what it buys."""


@register_policy("least_load")
class LeastLoadPolicy(PolicyBase):
    """Scans the live fleet once per request: O(instances), no allocation but the decision."""

    Params = LeastLoadParams
    reads = frozenset({"num_running", "num_waiting", "waiting_prefill_tokens"})

    def __init__(self, params: PolicyParams, *, clock: Clock) -> None:
        super().__init__(params, clock=clock)
        self._count_pending = params.count_pending if isinstance(params, LeastLoadParams) else True

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        count_pending = self._count_pending
        best: InstanceState | None = None
        best_queue = best_prefill = 0
        # ``fleet.instances`` is sorted by id and only a strictly lighter instance replaces
        # ``best``, so equal loads resolve to the lowest id without building sort keys.
        for state in fleet.instances:
            r = state.report
            queue = r.num_running + r.num_waiting if r is not None else 0
            prefill = r.waiting_prefill_tokens if r is not None else 0
            if count_pending:
                queue += state.pending_requests
                prefill += state.pending_prefill_tokens
            if best is None or queue < best_queue or (queue == best_queue and prefill < best_prefill):
                best, best_queue, best_prefill = state, queue, prefill
        assert best is not None, "the core never asks with an empty fleet"
        return RoutingDecision(
            best.info.instance_id,
            RoutingOutcome.LOAD,
            estimates=((best.info.instance_id, float(best_queue)),),
            reason="fewest running + waiting + dispatched requests",
        )
