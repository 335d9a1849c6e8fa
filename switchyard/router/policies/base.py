"""The contract between the router core and a routing policy.

A policy is a pure decision function: ``choose`` reads the request and a ``FleetView`` (load
is pushed to the router, so there is nothing to fetch) and returns a ``RoutingDecision`` with
its reasoning, without I/O or ``await``. That keeps policies deterministic under an injected
clock, testable without servers, and cheap enough to run per request. Policy state (rings,
per-instance prefix records, TTFT estimators) is kept current through lifecycle hooks, not by
the constructor: ``on_membership`` when instances come and go, ``on_dispatched`` and
``on_finished`` around each request.

Policies never record metrics; the core turns ``RoutingDecision.outcome`` into the
``switchyard_routing_decisions_total`` label and keeps decisions for the debug view.

Shared machinery that later policies need (``DualRing``, ``TtftEstimator``) lives in its own
modules; such a policy builds it from its ``Params`` in ``__init__`` or accepts it as an extra
keyword argument with a default, so ``make_policy(name, params, clock=...)`` stays the one
way the core builds any policy.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from switchyard.config import StrictModel
from switchyard.messages import InstanceInfo, RoutingRequest
from switchyard.router.registry import FleetView

__all__ = ["Clock", "Policy", "PolicyBase", "PolicyParams", "RoutingDecision", "RoutingOutcome"]

Clock = Callable[[], float]


class RoutingOutcome(enum.StrEnum):
    """Why an instance was chosen; the ``outcome`` label of the decisions metric."""

    AFFINITY = "affinity"
    """A cache-affinity candidate won (the request's prefix is likely cached there)."""
    SLO_SWITCH = "slo_switch"
    """Affinity would break the TTFT SLO, so the policy fell back to load."""
    LOAD = "load"
    """Chosen by load (or by rotation) alone."""


class RoutingDecision(NamedTuple):
    """Where a request goes and why; also the record the debug view shows.

    A ``NamedTuple`` rather than a frozen dataclass: just as immutable, and built once per
    request on the hot path, where a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) cost ~1.5 µs more, 4 % of a ``dualmap`` decision.
    """

    instance_id: str
    outcome: RoutingOutcome = RoutingOutcome.LOAD
    candidates: tuple[str, ...] = ()
    """Instances the policy seriously considered (e.g. DualMap's two), best first."""
    estimates: tuple[tuple[str, float], ...] = ()
    """``(instance_id, score)`` pairs behind the choice (queue length, estimated TTFT in s, ...)."""
    reason: str = ""
    """One human-readable sentence; keep it a constant or cheap to format."""
    memo: Any = None
    """What the deciding policy needs again in ``on_dispatched`` (DualMap: the prompt's digest
    and the load terms at the choice), opaque to everyone else and left out of ``as_dict``.
    Carried by the decision, not stashed in the policy, so ``choose`` stays pure: a decision
    that is never dispatched leaves nothing behind, and one made for another request cannot
    be confused with it."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the debug view (built only when someone asks)."""
        return {
            "instance_id": self.instance_id,
            "outcome": self.outcome.value,
            "candidates": list(self.candidates),
            "estimates": dict(self.estimates),
            "reason": self.reason,
        }


class PolicyParams(StrictModel):
    """Base of every policy's parameter model: strict (unknown keys are errors) and frozen."""


@runtime_checkable
class Policy(Protocol):
    """What the router core calls. See the module docstring for the rules."""

    name: ClassVar[str]
    """The registered name (set by ``register_policy``)."""
    Params: ClassVar[type[PolicyParams]]
    """The pydantic model validating ``RouterConfig.policy_params``."""
    reads: ClassVar[frozenset[str]]
    """``LoadReport`` fields the policy depends on; checked when the policy is built."""

    def on_membership(self, instances: Sequence[InstanceInfo]) -> None:
        """The full new membership (all models), sorted by instance id."""
        ...

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        """Pick one of ``fleet``'s live instances for ``req``. Pure: no I/O, no await.

        ``fleet`` is never empty (the core raises ``CapacityError`` first). Called again, with
        the failed instance gone from the fleet, when a request fails over.
        """
        ...

    def on_dispatched(self, req: RoutingRequest, decision: RoutingDecision) -> None:
        """``req`` was sent where ``decision`` (this policy's own, from ``choose``) says."""
        ...

    def on_finished(self, request_id: str, instance_id: str, *, num_cached_tokens: int) -> None:
        """A dispatched request left ``instance_id`` (finished, aborted, failed or moved).

        ``num_cached_tokens`` is the engine-reported prefix-cache hit for its prompt (0 when no
        output arrived), which affinity policies use to correct their prefix records.
        """
        ...


class PolicyBase:
    """Convenience base: stores params and clock, and makes every hook a no-op.

    Subclasses set ``Params``/``reads`` and implement ``choose``; they override hooks only
    when they keep state.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    reads: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: PolicyParams, *, clock: Clock = time.monotonic) -> None:
        self.params = params
        self.clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    def on_membership(self, instances: Sequence[InstanceInfo]) -> None:
        return None

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        raise NotImplementedError

    def on_dispatched(self, req: RoutingRequest, decision: RoutingDecision) -> None:
        return None

    def on_finished(self, request_id: str, instance_id: str, *, num_cached_tokens: int) -> None:
        return None
