"""``power_of_two``: two instances drawn at random, the lighter one wins.

The classic load-balancing baseline (Mitzenmacher's "power of two choices", Ray Serve's
default router): sampling two instances and keeping the less loaded one brings the maximum
load down from O(log n / log log n) to O(log log n) over random placement, at the cost of
two reads and no global scan. It is DualMap without the rings: comparing the two isolates
what hashing the prefix onto the candidates buys.

Load is the queue length the router knows of (reported running + waiting, plus requests it
dispatched since the report); ties go to fewer prompt tokens waiting for prefill, then to
the first draw. The random source is a ``random.Random`` seeded from the params (or passed
in), so a run repeats exactly.
"""

from __future__ import annotations

import random

from pydantic import Field

from switchyard.messages import RoutingRequest
from switchyard.router.policies import register_policy
from switchyard.router.policies.base import Clock, PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.registry import FleetView

__all__ = ["PowerOfTwoParams", "PowerOfTwoPolicy"]


class PowerOfTwoParams(PolicyParams):
    """Parameters of ``power_of_two``."""

    seed: int = Field(default=0, ge=0)
    """Seed of the policy's own random generator, so runs repeat."""


@register_policy("power_of_two")
class PowerOfTwoPolicy(PolicyBase):
    """Two distinct random draws, the shorter queue wins. O(1) per request."""

    Params = PowerOfTwoParams
    reads = frozenset({"num_running", "num_waiting", "waiting_prefill_tokens"})

    def __init__(self, params: PolicyParams, *, clock: Clock, rng: random.Random | None = None) -> None:
        super().__init__(params, clock=clock)
        seed = params.seed if isinstance(params, PowerOfTwoParams) else 0
        self._rng = rng or random.Random(seed)

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        instances = fleet.instances
        n = len(instances)
        if n == 1:
            only = instances[0]
            return RoutingDecision(
                only.info.instance_id,
                RoutingOutcome.LOAD,
                (only.info.instance_id,),
                ((only.info.instance_id, float(only.queue_length)),),
                "the only live instance",
            )
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        j += j >= i  # a second, distinct index without rejection sampling
        a, b = instances[i], instances[j]
        qa, qb = a.queue_length, b.queue_length
        if qb < qa or (qb == qa and b.waiting_prefill_tokens < a.waiting_prefill_tokens):
            a, b, qa, qb = b, a, qb, qa
        return RoutingDecision(
            a.info.instance_id,
            RoutingOutcome.LOAD,
            (a.info.instance_id, b.info.instance_id),
            ((a.info.instance_id, float(qa)), (b.info.instance_id, float(qb))),
            "shorter queue of two random instances",
        )
