"""Routing policies as pure decision functions over a FleetView: no servers, an injected clock."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import pytest

import switchyard.router as router_pkg
from switchyard.errors import ConfigError
from switchyard.messages import Membership, RoutingRequest
from switchyard.router.policies import (
    POLICIES,
    PolicyBase,
    RoutingDecision,
    RoutingOutcome,
    make_policy,
    policy_params,
    register_policy,
)
from switchyard.router.registry import FleetView
from tests.helpers.builders import FakeClock, make_info, make_registry, make_report, make_request

ALL_POLICIES = sorted(POLICIES)


def test_builtin_policies_are_registered() -> None:
    """The baselines and DualMap are available by name as soon as the package is imported."""
    builtin = {"round_robin", "least_load", "power_of_two", "consistent_hash", "prefix_tree", "dualmap"}
    assert builtin <= set(POLICIES)


def _isort_key(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 enforces: CONSTANTS, then Classes, then functions.
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def test_router_package_exports_are_sorted() -> None:
    """``switchyard.router.__all__`` is sorted (ruff's isort style) and every name in it exists."""
    assert router_pkg.__all__ == sorted(router_pkg.__all__, key=_isort_key)
    assert all(hasattr(router_pkg, name) for name in router_pkg.__all__)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_routes_only_to_live_instances(policy: str) -> None:
    """Instances marked down or gone from membership never receive work, whatever the policy."""
    registry = make_registry(4)
    registry.mark_down("w1")
    registry.mark_down("w3")
    p = make_policy(policy, {}, clock=FakeClock())
    chosen = Counter(p.choose(make_request(f"r{i}"), registry.fleet("m")).instance_id for i in range(40))
    assert set(chosen) <= {"w0", "w2"}, f"{chosen=}"


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_decision_names_a_fleet_member_and_an_outcome(policy: str) -> None:
    """A decision is a live instance id plus one of the metric's outcome labels."""
    registry = make_registry(3)
    decision = make_policy(policy).choose(make_request(), registry.fleet("m"))
    assert isinstance(decision, RoutingDecision)
    assert registry.fleet("m").get(decision.instance_id) is not None
    assert decision.outcome in set(RoutingOutcome)
    assert decision.as_dict()["instance_id"] == decision.instance_id


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_unknown_parameters_are_a_config_error(policy: str) -> None:
    """Policy params are strict: a typo fails at start-up, naming the policy."""
    with pytest.raises(ConfigError, match=policy):
        make_policy(policy, {"no_such_knob": 1})


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_hooks_tolerate_strangers_and_membership_churn(policy: str) -> None:
    """Feedback about requests a policy never placed, and instances leaving, never raise."""
    registry = make_registry(3)
    p = make_policy(policy, {}, clock=FakeClock())
    p.on_membership(list(registry.membership.instances))
    p.on_finished("never-seen", "w0", num_cached_tokens=5)
    req = make_request("r1", tokens=300)
    decision = p.choose(req, registry.fleet("m"))
    p.on_dispatched(req, decision)
    registry.apply(Membership(2, (make_info("w9"),)))
    p.on_membership(list(registry.membership.instances))
    p.on_finished("r1", decision.instance_id, num_cached_tokens=0)
    assert p.choose(make_request("r2", tokens=300), registry.fleet("m")).instance_id == "w9"


def test_unknown_policy_lists_the_known_ones() -> None:
    """An unknown name raises ConfigError listing every registered name."""
    with pytest.raises(ConfigError) as info:
        make_policy("dualmapp")
    for name in ALL_POLICIES:
        assert name in str(info.value)


def test_policy_params_give_an_slo_policy_the_router_slo() -> None:
    """A policy with a ``ttft_slo_ms`` parameter is built with the router's SLO; repeating that
    SLO in its parameters is fine, another value is a ConfigError naming both; a policy without
    one gets its parameters unchanged."""
    assert policy_params("dualmap", {"prefix_blocks": 2}, ttft_slo_ms=1500) == {
        "prefix_blocks": 2,
        "ttft_slo_ms": 1500,
    }
    assert policy_params("dualmap", {"ttft_slo_ms": 1500.0}, ttft_slo_ms=1500) == {"ttft_slo_ms": 1500}
    assert policy_params("least_load", None, ttft_slo_ms=1500) == {}
    with pytest.raises(ConfigError, match=r"ttft_slo_ms=1000 ms.* is 1500 ms"):
        policy_params("dualmap", {"ttft_slo_ms": 1000}, ttft_slo_ms=1500)
    with pytest.raises(ConfigError, match="unknown routing policy 'nope'"):
        policy_params("nope", {}, ttft_slo_ms=1500)


def test_register_policy_rejects_taken_names_and_unknown_load_fields() -> None:
    """Registration fails fast on a duplicate name or a ``reads`` field load reports lack."""
    with pytest.raises(ConfigError, match="already taken"):

        @register_policy("round_robin")
        class Imposter(PolicyBase):
            pass

    with pytest.raises(ConfigError, match="gpu_temperature"):

        @register_policy("needs_temperature")
        class NeedsTemperature(PolicyBase):
            reads: ClassVar[frozenset[str]] = frozenset({"gpu_temperature"})

    assert "needs_temperature" not in POLICIES


def test_round_robin_cycles_in_id_order() -> None:
    """Round robin visits w0, w1, w2 and starts over."""
    registry = make_registry(3)
    p = make_policy("round_robin")
    picks = [p.choose(make_request(), registry.fleet("m")).instance_id for _ in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]


def _least_load_pick(fleet: FleetView, req: RoutingRequest | None = None) -> str:
    return make_policy("least_load").choose(req or make_request(), fleet).instance_id


def test_least_load_picks_the_lightest_reported_instance() -> None:
    """Running + waiting decides: the instance with the fewest requests wins."""
    registry = make_registry(3)
    registry.on_load_report("w0", make_report("w0", running=4, waiting=1))
    registry.on_load_report("w1", make_report("w1", running=2, waiting=0))
    registry.on_load_report("w2", make_report("w2", running=1, waiting=3))
    assert _least_load_pick(registry.fleet("m")) == "w1"


def test_least_load_counts_requests_dispatched_since_the_last_report() -> None:
    """Between two reports, the router's own dispatches spread a burst instead of piling it up."""
    registry = make_registry(2)
    for iid in ("w0", "w1"):
        registry.on_load_report(iid, make_report(iid, running=1))
    fleet = registry.fleet("m")
    policy = make_policy("least_load")
    picks = []
    for i in range(4):
        decision = policy.choose(make_request(f"r{i}"), fleet)
        state = fleet.get(decision.instance_id)
        assert state is not None
        registry.on_dispatched(state, prefill_tokens=8)
        picks.append(decision.instance_id)
    assert picks == ["w0", "w1", "w0", "w1"]


def test_least_load_without_pending_ignores_dispatches() -> None:
    """``count_pending=False`` (the ablation) sees only the reports, so a burst piles up."""
    registry = make_registry(2)
    fleet = registry.fleet("m")
    policy = make_policy("least_load", {"count_pending": False})
    for _ in range(3):
        state = fleet.get(policy.choose(make_request(), fleet).instance_id)
        assert state is not None
        registry.on_dispatched(state, prefill_tokens=8)
    assert policy.choose(make_request(), fleet).instance_id == "w0"


def test_least_load_breaks_ties_by_waiting_prefill_tokens_then_id() -> None:
    """Equal queues: fewer prompt tokens waiting wins; equal on both, the lowest id wins."""
    registry = make_registry(3)
    registry.on_load_report("w0", make_report("w0", waiting=2, prefill_tokens=900))
    registry.on_load_report("w1", make_report("w1", waiting=2, prefill_tokens=100))
    registry.on_load_report("w2", make_report("w2", waiting=2, prefill_tokens=100))
    assert _least_load_pick(registry.fleet("m")) == "w1"
    registry.on_load_report("w1", make_report("w1", waiting=2, prefill_tokens=900))
    registry.on_load_report("w2", make_report("w2", waiting=2, prefill_tokens=900))
    assert _least_load_pick(registry.fleet("m")) == "w0"


def test_least_load_treats_unreported_instances_as_empty() -> None:
    """A new instance without a report yet is the lightest, until the router fills it."""
    registry = make_registry(1)
    registry.on_load_report("w0", make_report("w0", running=1))
    registry.apply(Membership(2, (make_info("w0"), make_info("w1"))))
    assert _least_load_pick(registry.fleet("m")) == "w1"


def test_policies_only_see_their_model() -> None:
    """A request's fleet holds only instances of its model."""
    registry = make_registry(2)
    registry.apply(Membership(2, (*registry.membership.instances, make_info("x0", model="other"))))
    for policy in ALL_POLICIES:
        picks = {make_policy(policy).choose(make_request(model="other"), registry.fleet("other")).instance_id}
        assert picks == {"x0"}
