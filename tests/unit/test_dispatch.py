"""``router.dispatch``: the hook sequence around a policy, and that the router core and the
routing benchmark both run it (a router change is a benchmark change)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.replay import ReplayConfig, replay
from bench.traces import Trace, TraceRequest
from switchyard.config import RouterConfig
from switchyard.errors import EngineRequestError
from switchyard.messages import InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router import dispatch as dispatch_module
from switchyard.router.core import RouterCore
from switchyard.router.dispatch import Dispatcher
from switchyard.router.policies.base import PolicyBase, RoutingDecision
from switchyard.router.registry import FleetView
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.builders import make_registry, make_request
from tests.helpers.scripted_engine import ScriptedEngine


class Recorder(PolicyBase):
    """Picks the first instance and records every hook, with the registry's pending count."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__(PolicyBase.Params())
        self.events: list[tuple[str, int]] = []
        self.fleet: FleetView | None = None

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        self.fleet = fleet
        state = fleet.instances[0]
        self.events.append(("choose", state.pending_requests))
        return RoutingDecision(state.info.instance_id, estimates=((state.info.instance_id, 0.25),))

    def on_dispatched(self, req: RoutingRequest, decision: RoutingDecision) -> None:
        assert self.fleet is not None
        state = self.fleet.get(decision.instance_id)
        assert state is not None
        self.events.append(("dispatched", state.pending_requests))

    def on_first_token(
        self, request_id: str, instance_id: str, *, ttft_s: float, num_cached_tokens: int
    ) -> None:
        self.events.append(("first_token", num_cached_tokens))

    def on_finished(self, request_id: str, instance_id: str, *, num_cached_tokens: int) -> None:
        self.events.append(("finished", num_cached_tokens))


def test_hooks_run_in_order_and_the_registry_counts_the_request_in_between() -> None:
    registry = make_registry(2)
    policy = Recorder()
    dispatcher = Dispatcher(policy, "recorder")
    assert dispatcher.feedback is policy  # it has on_first_token: it estimates TTFT
    req = make_request("r", tokens=64)
    state, decision = dispatcher.choose(req, registry.fleet("m"))
    d = dispatcher.dispatched(req, state, decision, 64)
    assert (state.pending_requests, state.pending_prefill_tokens) == (1, 64)
    assert d.first_token(0.75, num_cached_tokens=32) == pytest.approx(0.5)  # measured - estimated
    assert state.pending_prefill_tokens == 0
    d.finished()
    assert (state.pending_requests, state.inflight_requests) == (0, 0)
    assert policy.events == [("choose", 0), ("dispatched", 1), ("first_token", 32), ("finished", 32)]


def test_a_request_that_fails_before_its_first_token_releases_its_prefill() -> None:
    registry = make_registry(1)
    dispatcher = Dispatcher(Recorder(), "recorder")
    req = make_request("r", tokens=100)
    state, decision = dispatcher.choose(req, registry.fleet("m"))
    dispatcher.dispatched(req, state, decision, 100).finished()
    assert (state.pending_requests, state.pending_prefill_tokens) == (0, 0)


def test_a_choice_outside_the_fleet_is_an_error_naming_the_policy() -> None:
    class Stray(Recorder):
        def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
            return RoutingDecision("elsewhere")

    with pytest.raises(EngineRequestError, match="policy stray chose 'elsewhere'"):
        Dispatcher(Stray(), "stray").choose(make_request("r"), make_registry(2).fleet("m"))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every ``Dispatch`` created, by request id, whoever creates it."""
    seen: list[str] = []
    original = dispatch_module.Dispatch.__init__

    def counting(
        self: dispatch_module.Dispatch, dispatcher: Dispatcher, req: RoutingRequest, *a: object
    ) -> None:
        seen.append(req.request_id)
        original(self, dispatcher, req, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch_module.Dispatch, "__init__", counting)
    yield seen


def test_the_routing_benchmark_dispatches_through_the_router_path(counted: list[str]) -> None:
    requests = tuple(TraceRequest(i, 0.05 * i, 600, 4, (i % 3, 100 + i)) for i in range(40))
    trace = Trace("in-test", "mooncake", requests)
    result = replay(trace, "least_load", ReplayConfig(num_instances=2, scale=1))
    assert counted == [f"r{i}" for i in range(40)]
    assert sum(result.requests_per_instance.values()) == 40


async def test_the_router_core_dispatches_through_the_same_path(counted: list[str]) -> None:
    engine = ScriptedEngine("w0", tokens=[1, 2, 3])

    def info(port: int) -> InstanceInfo:
        return InstanceInfo("w0", f"127.0.0.1:{port}", "m", engine="sim")

    server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
    core = RouterCore(RouterConfig(policy="least_load", load_report_interval_s=0.02))
    try:
        core.apply_membership(Membership(1, (info(port),)))
        await core.start()
        req = RoutingRequest("core-1", "m", [5, 6, 7], SamplingOptions(max_tokens=3, temperature=0.0))
        tokens = [t async for out in core.generate(req) for t in out.token_ids]
        assert tokens == [1, 2, 3]
        assert counted == ["core-1"]
    finally:
        await core.close()
        await server.stop(None)
