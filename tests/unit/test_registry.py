"""The instance registry: versioned membership, load reports, and in-flight accounting between them."""

from __future__ import annotations

from switchyard.messages import Membership
from switchyard.router.registry import InstanceRegistry, InstanceState
from tests.helpers.builders import FakeClock, make_info, make_registry, make_report


def _state(registry: InstanceRegistry, iid: str) -> InstanceState:
    state = registry.get(iid)
    assert state is not None, f"{iid=} not registered"
    return state


def test_membership_diff_reports_added_removed_and_changed() -> None:
    """A new incarnation of an instance counts as removed and added; others are diffed by id."""
    registry = make_registry(2)
    diff = registry.apply(Membership(2, (make_info("w0", incarnation=1), make_info("w2"))))
    assert diff is not None
    assert sorted(i.instance_id for i in diff.removed) == ["w0", "w1"]
    assert sorted((i.instance_id, i.incarnation) for i in diff.added) == [("w0", 1), ("w2", 0)]
    assert sorted(s.instance_id for s in registry) == ["w0", "w2"]
    assert registry.membership.version == 2


def test_stale_membership_is_ignored() -> None:
    """Versions only grow: an older or equal version changes nothing."""
    registry = make_registry(2)
    assert registry.apply(Membership(1, ())) is None
    assert registry.apply(Membership(0, ())) is None
    assert len(registry) == 2


def test_departed_instance_loses_its_load() -> None:
    """Removing an instance drops its state; a late report for it is ignored."""
    registry = make_registry(2)
    registry.on_load_report("w1", make_report("w1", running=3))
    registry.apply(Membership(2, (make_info("w0"),)))
    assert registry.get("w1") is None
    assert registry.on_load_report("w1", make_report("w1")) is None
    registry.apply(Membership(3, (make_info("w0"), make_info("w1"))))
    assert _state(registry, "w1").report is None, "a returning instance starts without old load"


def test_fleet_is_sorted_per_model_and_cached_until_a_change() -> None:
    """fleet() is the same object between changes (O(1) per request) and rebuilt after one."""
    registry = InstanceRegistry(clock=FakeClock())
    registry.apply(Membership(1, (make_info("b"), make_info("a"), make_info("z", model="other"))))
    fleet = registry.fleet("m")
    assert [s.instance_id for s in fleet] == ["a", "b"]
    assert registry.fleet("m") is fleet
    registry.on_load_report("a", make_report("a", running=2))
    assert registry.fleet("m") is fleet, "load changes must not rebuild the view"
    assert fleet.instances[0].num_running == 2, "the view reads live state"
    registry.mark_down("a")
    assert [s.instance_id for s in registry.fleet("m")] == ["b"]
    assert registry.models() == {"m": make_info("a"), "other": make_info("z", model="other")}
    assert registry.serves("other") and not registry.serves("nope")


def test_mark_down_until_the_next_report() -> None:
    """A dead-marked instance leaves the fleet and comes back with its next load report."""
    registry = make_registry(2)
    assert registry.mark_down("w0") is True
    assert registry.mark_down("w0") is False
    assert registry.fleet("m").get("w0") is None
    registry.on_load_report("w0", make_report("w0"))
    assert registry.fleet("m").get("w0") is not None


def test_ready_needs_a_report_from_a_live_instance() -> None:
    """ready is False until some live instance has reported its load."""
    registry = make_registry(2)
    assert not registry.ready
    registry.on_load_report("w0", make_report("w0"))
    assert registry.ready
    registry.mark_down("w0")
    assert not registry.ready


def test_not_ready_once_every_instance_is_drained_or_down_with_the_reason() -> None:
    """A drained instance takes no new work, so a fleet of drained ones is not ready (a
    readiness probe must fail), and the reason says which case it is."""
    registry = make_registry(2)
    assert registry.unready_reason() == "none of the 2 engine instances reports its load (starting, or down)"
    registry.on_load_report("w0", make_report("w0"))
    registry.on_load_report("w1", make_report("w1"))
    assert registry.ready and registry.unready_reason() is None
    registry.set_draining("w0", True)
    assert registry.ready, "w1 still takes work"
    registry.set_draining("w1", True)
    assert not registry.ready
    assert registry.unready_reason() == "every live engine instance is draining (2 of 2)"
    registry.set_draining("w1", False)
    assert registry.ready
    registry.mark_down("w1")
    assert registry.unready_reason() == "every live engine instance is draining (1 of 2)"
    registry.mark_down("w0")
    assert registry.unready_reason() == "none of the 2 engine instances reports its load (starting, or down)"
    registry.apply(Membership(version=registry.membership.version + 1))
    assert registry.unready_reason() == "no live engine instances"


def test_dispatches_are_pending_until_a_report_supersedes_them() -> None:
    """Dispatched requests add to the reported queue; the next report resets the pending part."""
    clock = FakeClock()
    registry = make_registry(1, clock=clock)
    state = _state(registry, "w0")
    registry.on_load_report("w0", make_report("w0", running=1, prefill_tokens=10))
    InstanceRegistry.on_dispatched(state, 100)
    InstanceRegistry.on_dispatched(state, 50)
    assert (state.queue_length, state.waiting_prefill_tokens, state.inflight_requests) == (3, 160, 2)
    clock.advance(0.05)
    registry.on_load_report("w0", make_report("w0", running=3))
    assert (state.queue_length, state.waiting_prefill_tokens, state.inflight_requests) == (3, 0, 2)
    assert state.reported_at == clock.now


def test_finishing_within_the_epoch_undoes_the_pending_count() -> None:
    """A request that starts and ends between two reports leaves no trace in the pending counts."""
    registry = make_registry(1)
    state = _state(registry, "w0")
    epoch = InstanceRegistry.on_dispatched(state, 64)
    InstanceRegistry.on_first_token(state, epoch, 64)
    assert (state.pending_requests, state.pending_prefill_tokens) == (1, 0)
    InstanceRegistry.on_finished(state, epoch, 64, prefilled=True)
    assert (state.pending_requests, state.pending_prefill_tokens, state.inflight_requests) == (0, 0, 0)

    epoch = InstanceRegistry.on_dispatched(state, 32)
    InstanceRegistry.on_finished(state, epoch, 32, prefilled=False)  # failed before any output
    assert (state.pending_requests, state.pending_prefill_tokens) == (0, 0)


def test_finishing_after_a_report_only_touches_in_flight() -> None:
    """Once a report has superseded a dispatch, finishing it must not drive pending below zero."""
    registry = make_registry(1)
    state = _state(registry, "w0")
    epoch = InstanceRegistry.on_dispatched(state, 64)
    registry.on_load_report("w0", make_report("w0", running=1))
    InstanceRegistry.on_first_token(state, epoch, 64)
    InstanceRegistry.on_finished(state, epoch, 64, prefilled=True)
    assert (state.pending_requests, state.pending_prefill_tokens, state.inflight_requests) == (0, 0, 0)


def test_kv_usage_comes_from_the_report() -> None:
    """kv_usage is the reported used/total fraction, 0 before any report."""
    registry = make_registry(1)
    state = _state(registry, "w0")
    assert state.kv_usage == 0.0
    registry.on_load_report("w0", make_report("w0", kv_used=25))
    assert state.kv_usage == 0.25
