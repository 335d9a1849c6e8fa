"""``round_robin``: each request to the next live instance in id order.

The load-blind baseline every other policy is compared against. It needs no load reports,
so it also works before any arrive.
"""

from __future__ import annotations

from switchyard.messages import RoutingRequest
from switchyard.router.policies import register_policy
from switchyard.router.policies.base import Clock, PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.registry import FleetView

__all__ = ["RoundRobinParams", "RoundRobinPolicy"]


class RoundRobinParams(PolicyParams):
    """Round robin takes no parameters."""


@register_policy("round_robin")
class RoundRobinPolicy(PolicyBase):
    """Cycles through the fleet. O(1) per request: one index, one decision object."""

    Params = RoundRobinParams

    def __init__(self, params: PolicyParams, *, clock: Clock) -> None:
        super().__init__(params, clock=clock)
        self._counter = 0

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        instances = fleet.instances
        # When membership changes the modulus changes too; the rotation just continues from
        # a different offset, which is all round robin promises.
        state = instances[self._counter % len(instances)]
        self._counter += 1
        return RoutingDecision(state.info.instance_id, RoutingOutcome.LOAD, reason="next in rotation")
