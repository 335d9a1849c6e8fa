"""``plan_rebalance``: which requests move where, table-driven over load snapshots."""

from __future__ import annotations

import pytest

from switchyard.config import RebalancerConfig
from switchyard.messages import InstanceInfo, LoadReport, Membership
from switchyard.router.rebalancer import (
    InstanceLoad,
    Move,
    Rebalancer,
    RequestLoad,
    freeness,
    plan_rebalance,
    pressure,
)
from switchyard.router.registry import InstanceRegistry


def inst(
    iid: str,
    running: int,
    *,
    waiting: int = 0,
    free: int = 100,
    tokens: tuple[int, ...] | None = None,
    draining: bool = False,
    model: str = "m",
) -> InstanceLoad:
    """An instance whose running requests are ``{iid}-{k}`` with ``tokens[k]`` tokens each."""
    sizes = tokens if tokens is not None else tuple(10 * (k + 1) for k in range(running))
    reqs = tuple(RequestLoad(f"{iid}-{k}", n) for k, n in enumerate(sizes))
    return InstanceLoad(iid, model, free, running, waiting, 32, draining, reqs)


P = RebalancerConfig(enabled=True, max_moves_per_period=4, imbalance_ratio=1.5, min_load_gap=1, max_waiting=4)

CASES: list[tuple[str, list[InstanceLoad], RebalancerConfig, list[tuple[str, str, str]]]] = [
    ("balanced fleet: nothing moves", [inst("a", 2), inst("b", 2), inst("c", 2)], P, []),
    ("a single instance: nowhere to go", [inst("a", 9)], P, []),
    (
        "hotspot: shortest requests first, freest destinations, until the source is near the mean",
        [inst("a", 4), inst("b", 0), inst("c", 0)],
        P,
        [("a-0", "a", "c"), ("a-1", "a", "b")],
    ),
    (
        "shortest running first (Llumnix SR)",
        [inst("a", 3, tokens=(50, 10, 30)), inst("b", 0)],
        P.model_copy(update={"max_moves_per_period": 1}),
        [("a-1", "a", "b")],
    ),
    (
        "at most max_moves_per_period",
        [inst("a", 8), inst("b", 0), inst("c", 0), inst("d", 0)],
        P.model_copy(update={"max_moves_per_period": 2}),
        [("a-0", "a", "d"), ("a-1", "a", "c")],
    ),
    (
        "min_load_gap keeps a nearly idle fleet still",
        [inst("a", 2), inst("b", 0), inst("c", 0)],
        P.model_copy(update={"min_load_gap": 2}),
        [],
    ),
    (
        "a long waiting queue is an overload whatever the mean",
        [inst("a", 2, waiting=5), inst("b", 2), inst("c", 2)],
        P.model_copy(update={"imbalance_ratio": 10.0, "max_moves_per_period": 1}),
        [("a-0", "a", "c")],
    ),
    (
        "never to a draining instance",
        [inst("a", 4), inst("b", 0, draining=True), inst("c", 0)],
        P,
        [("a-0", "a", "c"), ("a-1", "a", "c")],
    ),
    (
        "never from a draining instance (the drain owns its requests)",
        [inst("a", 6, draining=True), inst("b", 0), inst("c", 0)],
        P,
        [],
    ),
    (
        "never to an instance that is itself loaded (above the mean after the move)",
        [inst("a", 6), inst("b", 5), inst("c", 5)],
        P,
        [],
    ),
    (
        "never to an instance with less freeness than the source",
        [inst("a", 4, free=400), inst("b", 0, free=3), inst("c", 0, free=3)],
        P,
        [],
    ),
    (
        "never to an instance without room for the request's blocks",
        [inst("a", 4, tokens=(200, 300, 400, 500)), inst("b", 0, free=5), inst("c", 0, free=5)],
        P,
        [],
    ),
    (
        "models never mix",
        [inst("a", 4), inst("b", 0, model="other"), inst("c", 0, model="other")],
        P,
        [],
    ),
]


@pytest.mark.parametrize(("fleet", "params", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_rebalance(
    fleet: list[InstanceLoad], params: RebalancerConfig, expected: list[tuple[str, str, str]]
) -> None:
    moves = plan_rebalance(fleet, params)
    assert [(m.request_id, m.source, m.destination) for m in moves] == expected


def test_skip_and_reason() -> None:
    fleet = [inst("a", 4), inst("b", 0), inst("c", 0)]
    moves = plan_rebalance(fleet, P.model_copy(update={"max_moves_per_period": 1}), skip={"a-0"})
    assert moves == [Move("a-1", "a", "c", "imbalance")]
    queued = [inst("a", 1, waiting=4), inst("b", 1)]
    assert [m.reason for m in plan_rebalance(queued, P)] == ["queue"]


def test_zero_moves_allowed_plans_nothing() -> None:
    fleet = [inst("a", 4), inst("b", 0)]
    assert plan_rebalance(fleet, P.model_copy(update={"max_moves_per_period": 0})) == []


def test_freeness() -> None:
    assert freeness(100, 0) == 100
    assert freeness(100, 4) == 20
    assert freeness(-3, 1) == 0


def test_registry_draining_leaves_every_fleet_view() -> None:
    reg = InstanceRegistry()
    infos = tuple(InstanceInfo(i, "h:1", "m") for i in ("a", "b"))
    reg.apply(Membership(1, infos))
    for i in ("a", "b"):
        reg.on_load_report(i, LoadReport(instance_id=i, timestamp=0.0, kv_blocks_total=10))
    assert [s.instance_id for s in reg.fleet("m")] == ["a", "b"]
    assert reg.set_draining("a", True) and reg.is_draining("a")
    assert [s.instance_id for s in reg.fleet("m")] == ["b"]
    assert not reg.set_draining("zz", True)
    # A membership change keeps it draining; leaving the membership forgets it.
    reg.apply(Membership(2, infos))
    assert [s.instance_id for s in reg.fleet("m")] == ["b"]
    reg.apply(Membership(3, infos[1:]))
    reg.apply(Membership(4, infos))
    assert not reg.is_draining("a") and [s.instance_id for s in reg.fleet("m")] == ["a", "b"]
    assert reg.set_draining("b", True) and reg.set_draining("b", False)
    assert [s.instance_id for s in reg.fleet("m")] == ["a", "b"]


def test_pressure_uses_the_planners_definitions() -> None:
    """Overloaded by queue or imbalance, receivers at or under the mean with one more request;
    draining instances are neither."""
    loads = [inst("hot", 6), inst("queue", 1, waiting=4), inst("idle", 0), inst("gone", 9, draining=True)]
    p = pressure(loads, P)
    assert set(p.overloaded) == {"hot", "queue"} and p.receivers == ("idle",)


class _View:
    """A router view for a step: a registry with two reporting instances and one stream each."""

    def __init__(self) -> None:
        self.registry = InstanceRegistry()
        infos = tuple(InstanceInfo(i, f"{i}:1", "m", engine="sim") for i in ("a", "b"))
        self.registry.apply(Membership(1, infos))
        self.registry.on_load_report("a", LoadReport("a", 0.0, num_running=6, kv_blocks_total=100))
        self.registry.on_load_report("b", LoadReport("b", 0.0, num_running=0, kv_blocks_total=100))
        self.streams = {"r-a": _Stream("a", 40)}


class _Stream:
    def __init__(self, instance_id: str, num_tokens: int) -> None:
        self.instance_id, self.num_tokens, self.moving = instance_id, num_tokens, False


def test_a_step_plans_over_the_router_view_and_cools_down_what_it_tried() -> None:
    now = [0.0]
    step = Rebalancer(_View(), P.model_copy(update={"request_cooldown_s": 5.0}), clock=lambda: now[0])
    (move,) = step.plan()
    assert (move.request_id, move.source, move.destination) == ("r-a", "a", "b")
    assert {ld.instance_id for ld in step.last_loads} == {"a", "b"}
    step.attempting(move)
    now[0] = 4.0
    assert step.plan() == []  # cooling down
    now[0] = 5.5
    assert [m.request_id for m in step.plan()] == ["r-a"]


def test_the_rebalancing_benchmark_takes_the_routers_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark applies what ``Rebalancer.plan`` returns: change the router's step and the
    benchmark's moves change with it."""
    from bench.rebalance import _RebalancingReplay
    from bench.replay import ReplayConfig
    from bench.traces import Trace, TraceRequest

    # A burst of long prompts on one prefix: the hash policy piles them on one instance.
    requests = tuple(TraceRequest(i, 0.01 * i, 3000, 200, (1, 2, 3, 1000 + i)) for i in range(48))
    trace = Trace("in-test", "mooncake", requests)
    cfg = ReplayConfig(num_instances=4, scale=1.0)
    eager = P.model_copy(update={"period_s": 0.1, "max_waiting": 2})
    planned: list[Move] = []
    real_plan = Rebalancer.plan

    def recording(self: Rebalancer) -> list[Move]:
        moves = real_plan(self)
        planned.extend(moves)
        return moves

    monkeypatch.setattr(Rebalancer, "plan", recording)
    run = _RebalancingReplay(trace, "consistent_hash", cfg, eager)
    run.run()
    assert planned and planned == run.planned
    assert len(run.migrations) == len(planned)

    monkeypatch.setattr(Rebalancer, "plan", lambda self: [])
    idle = _RebalancingReplay(trace, "consistent_hash", cfg, eager)
    idle.run()
    assert idle.planned == [] and idle.migrations == []
