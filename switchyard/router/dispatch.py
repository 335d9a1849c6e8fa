"""The per-request hook sequence around a routing policy, written once.

Every dispatched request walks the same four steps, in this order:

1. **choose** — ``policy.choose(req, fleet)``; the chosen instance must be live in ``fleet``;
2. **dispatched** — the registry counts the request as pending on that instance (so the next
   choice sees it before the instance's next load report), then ``policy.on_dispatched``;
3. **first token** — the registry stops counting its prompt as waiting prefill, and a policy
   that estimates TTFT (``TtftFeedback``) hears the measured TTFT and the engine's cache hit;
4. **finished** — the registry releases the request, then ``policy.on_finished`` with the
   engine-reported cached tokens (0 when no output arrived).

Why one module: the router core (``core.py``) and the routing benchmark (``bench/replay.py``)
both drive policies, and when each wrote the sequence itself, a change to one (an extra hook,
another order) silently left the benchmark measuring a router that no longer existed. Both
now call :class:`Dispatcher`, so a router change is a benchmark change.

Cost: one small slotted object per dispatch and no allocation per hook; the policy's own
work dominates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from switchyard.errors import EngineRequestError
from switchyard.messages import RoutingRequest
from switchyard.router.registry import FleetView, InstanceRegistry, InstanceState
from switchyard.router.ttft_estimator import TtftFeedback

if TYPE_CHECKING:
    from switchyard.router.policies.base import Policy, RoutingDecision

__all__ = ["Dispatch", "Dispatcher"]


class Dispatch:
    """One request on one instance, from ``dispatched`` to ``finished`` (steps 2-4)."""

    __slots__ = ("_dispatcher", "cached_tokens", "decision", "epoch", "num_prompt_tokens", "prefilled", "req",
                 "state")  # fmt: skip

    def __init__(
        self,
        dispatcher: Dispatcher,
        req: RoutingRequest,
        state: InstanceState,
        decision: RoutingDecision,
        num_prompt_tokens: int,
    ) -> None:
        self._dispatcher = dispatcher
        self.req = req
        self.state = state
        self.decision = decision
        self.num_prompt_tokens = num_prompt_tokens
        """Prompt tokens sent to the engine (after a failover: the original prompt + outputs)."""
        self.epoch = InstanceRegistry.on_dispatched(state, num_prompt_tokens)
        self.prefilled = False
        self.cached_tokens = 0
        dispatcher.policy.on_dispatched(req, decision)

    @property
    def instance_id(self) -> str:
        return self.decision.instance_id

    def first_token(self, ttft_s: float, num_cached_tokens: int) -> float | None:
        """Step 3. Returns the policy's TTFT estimate error for its choice (measured minus
        estimated, seconds), or None when the policy does not estimate TTFT."""
        self.prefilled = True
        self.cached_tokens = num_cached_tokens
        InstanceRegistry.on_first_token(self.state, self.epoch, self.num_prompt_tokens)
        feedback = self._dispatcher.feedback
        if feedback is None:
            return None
        decision = self.decision
        iid = decision.instance_id
        error = None
        for candidate, estimate_s in decision.estimates:
            if candidate == iid:
                error = ttft_s - estimate_s
                break
        feedback.on_first_token(self.req.request_id, iid, ttft_s=ttft_s, num_cached_tokens=num_cached_tokens)
        return error

    def finished(self) -> None:
        """Step 4: the request left the instance (finished, aborted, failed or moved)."""
        InstanceRegistry.on_finished(self.state, self.epoch, self.num_prompt_tokens, prefilled=self.prefilled)
        self._dispatcher.policy.on_finished(
            self.req.request_id, self.decision.instance_id, num_cached_tokens=self.cached_tokens
        )


class Dispatcher:
    """Runs the hook sequence for one policy over one registry."""

    __slots__ = ("feedback", "policy", "policy_name")

    def __init__(self, policy: Policy, policy_name: str) -> None:
        self.policy = policy
        self.policy_name = policy_name
        self.feedback: TtftFeedback | None = policy if isinstance(policy, TtftFeedback) else None
        """The policy, when it learns from measured TTFTs."""

    def choose(self, req: RoutingRequest, fleet: FleetView) -> tuple[InstanceState, RoutingDecision]:
        """Step 1. ``fleet`` must not be empty; raises ``EngineRequestError`` when the policy
        names an instance that is not live in it (a policy bug, never silently rerouted)."""
        decision = self.policy.choose(req, fleet)
        state = fleet.get(decision.instance_id)
        if state is None:
            raise EngineRequestError(
                f"policy {self.policy_name} chose {decision.instance_id!r}, "
                f"not a live instance of {fleet.model!r}"
            )
        return state, decision

    def dispatched(
        self, req: RoutingRequest, state: InstanceState, decision: RoutingDecision, num_prompt_tokens: int
    ) -> Dispatch:
        """Step 2: ``req`` (``num_prompt_tokens`` of prompt) was sent to ``state``."""
        return Dispatch(self, req, state, decision, num_prompt_tokens)
