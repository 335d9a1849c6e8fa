"""The router core and both gRPC services, for real: workers and router on port 0, no mocks of gRPC.

Each worker serves a ``ScriptedEngine`` whose tokens continue the context deterministically
(like greedy decoding), so a request that fails over mid-stream must still deliver exactly
the uninterrupted sequence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard import metrics
from switchyard.api.v1 import router_pb2, router_pb2_grpc, worker_pb2
from switchyard.config import RouterConfig
from switchyard.errors import EngineDeadError, InvalidRequestError, ModelNotFoundError
from switchyard.messages import EngineRequest, InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.router.grpc_server import start_router_server
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.scripted_engine import ScriptedEngine
from tests.helpers.waiting import eventually

MODEL = "scripted-model"
PROMPT = [5, 6, 7]


@dataclass
class Worker:
    engine: ScriptedEngine
    server: grpc.aio.Server
    info: InstanceInfo


class Fleet:
    """Scripted workers plus the membership versions a supervisor would publish."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.version = 0

    async def add(self, instance_id: str, *, delay_s: float = 0.005) -> Worker:
        engine = ScriptedEngine(instance_id, delay_s=delay_s)

        def info(port: int) -> InstanceInfo:
            return InstanceInfo(instance_id, f"127.0.0.1:{port}", MODEL, engine="sim")

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
        worker = self.workers[instance_id] = Worker(engine, server, info(port))
        return worker

    def membership(self, *ids: str) -> Membership:
        self.version += 1
        chosen = ids or tuple(sorted(self.workers))
        return Membership(self.version, tuple(self.workers[i].info for i in chosen))

    def engine_of(self, instance_id: str) -> ScriptedEngine:
        return self.workers[instance_id].engine


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet()
    for i in range(3):
        await fleet.add(f"w{i}", delay_s=0.01)
    yield fleet
    for w in fleet.workers.values():
        await w.server.stop(None)
    await eventually(lambda: all(w.engine.running == 0 for w in fleet.workers.values()))


@pytest.fixture
async def core(fleet: Fleet) -> AsyncIterator[RouterCore]:
    core = RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02))
    core.apply_membership(fleet.membership())
    await core.start()
    await eventually(lambda: core.ready)
    yield core
    await core.close()
    assert core._links.idle, "background tasks outlived close()"


@pytest.fixture
async def router(core: RouterCore) -> AsyncIterator[router_pb2_grpc.RouterStub]:
    server, port = await start_router_server(core, host="127.0.0.1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield router_pb2_grpc.RouterStub(channel)
    await server.stop(None)


def route_request(
    max_tokens: int = 6, *, model: str = MODEL, request_id: str = ""
) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(
        request_id=request_id,
        model=model,
        prompt_token_ids=PROMPT,
        sampling=worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def expected_tokens(n: int) -> list[int]:
    return [PROMPT[-1] + 1 + i for i in range(n)]


async def test_tokens_stream_through_router_generate(
    router: router_pb2_grpc.RouterStub, fleet: Fleet
) -> None:
    """Router.Generate streams the worker's tokens in order, stamped with an id and an instance."""
    chunks = [c async for c in router.Generate(route_request(6, model=""))]
    assert [t for c in chunks for t in c.token_ids] == expected_tokens(6)
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id, "one assigned request id"
    assert {c.instance_id for c in chunks} <= set(fleet.workers)
    assert chunks[0].num_prompt_tokens == len(PROMPT)
    engine = fleet.engine_of(chunks[0].instance_id)
    await eventually(lambda: engine.running == 0)
    assert engine.finished == [chunks[0].request_id] and engine.aborted == []
    body, content_type = metrics.render_latest()
    assert content_type.startswith("text/plain")
    assert b'switchyard_request_ttft_seconds_count{model="scripted-model",policy="round_robin"}' in body


async def test_round_robin_spreads_requests_and_records_decisions(
    router: router_pb2_grpc.RouterStub, core: RouterCore
) -> None:
    """Three requests through a round-robin router land on three instances; each decision is logged."""
    used = set()
    for n in range(3):
        chunks = [c async for c in router.Generate(route_request(2, request_id=f"rr-{n}"))]
        used.add(chunks[0].instance_id)
    assert len(used) == 3
    decisions = core.recent_decisions()
    assert [d["request_id"] for d in decisions[-3:]] == ["rr-0", "rr-1", "rr-2"]
    assert {d["outcome"] for d in decisions} == {"load"} and decisions[-1]["policy"] == "round_robin"


async def test_cancel_mid_stream_aborts_on_worker(router: router_pb2_grpc.RouterStub, fleet: Fleet) -> None:
    """A client that cancels its Router.Generate call aborts the request on the worker."""
    call = router.Generate(route_request(200, request_id="cancel-me"))
    first = await call.read()
    await call.read()
    engine = fleet.engine_of(first.instance_id)
    assert engine.running == 1
    call.cancel()
    await eventually(lambda: engine.running == 0)
    assert engine.aborted == ["cancel-me"]


async def test_closing_the_core_stream_aborts_on_worker(core: RouterCore, fleet: Fleet) -> None:
    """aclose() on RouterCore.generate's iterator (what the gateway does on disconnect) aborts."""
    req = RoutingRequest("close-me", MODEL, PROMPT, SamplingOptions(max_tokens=200))
    stream = core.generate(req)
    first = await anext(stream)
    engine = fleet.engine_of(first.instance_id)
    await stream.aclose()
    await eventually(lambda: engine.running == 0)
    assert engine.aborted == ["close-me"]


async def test_unknown_model_is_not_found(router: router_pb2_grpc.RouterStub, core: RouterCore) -> None:
    """An unknown model ends the call with NOT_FOUND naming the served models; the core raises at once."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [c async for c in router.Generate(route_request(model="nope"))]
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert MODEL in (info.value.details() or "")
    with pytest.raises(ModelNotFoundError):
        core.generate(RoutingRequest("x", "nope", PROMPT, SamplingOptions(max_tokens=1)))


async def test_no_live_instance_is_unavailable(router: router_pb2_grpc.RouterStub, core: RouterCore) -> None:
    """With every instance gone from membership, Generate answers UNAVAILABLE (retryable)."""
    core.apply_membership(Membership(core.membership.version + 1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [c async for c in router.Generate(route_request())]
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_stopped_worker_fails_over_without_losing_or_repeating_tokens(
    router: router_pb2_grpc.RouterStub, fleet: Fleet
) -> None:
    """Stopping the worker mid-stream moves the request; the client gets every token exactly once."""
    failovers_before = (
        metrics.REGISTRY.get_sample_value("switchyard_failovers_total", {"model": MODEL}) or 0.0
    )
    call = router.Generate(route_request(40, request_id="survivor"))
    tokens: list[int] = []
    instances: list[str] = []
    async for chunk in call:
        tokens.extend(chunk.token_ids)
        instances.append(chunk.instance_id)
        if len(tokens) == 5:
            await fleet.workers[instances[0]].server.stop(None)
    assert tokens == expected_tokens(40)
    assert len(set(instances)) == 2, f"expected one move, got {instances}"
    victim, rescuer = instances[0], instances[-1]
    assert fleet.engine_of(victim).aborted == ["survivor"]
    resubmitted = fleet.engine_of(rescuer).requests[-1]
    moved_after = len(resubmitted.prompt_token_ids) - len(PROMPT)
    assert list(resubmitted.prompt_token_ids) == PROMPT + expected_tokens(moved_after)
    assert resubmitted.sampling.max_tokens == 40 - moved_after
    failovers_after = metrics.REGISTRY.get_sample_value("switchyard_failovers_total", {"model": MODEL})
    assert failovers_after == failovers_before + 1


async def test_failover_gives_up_after_max_attempts(fleet: Fleet) -> None:
    """With no failover attempts allowed, a dead instance ends the stream with EngineDeadError."""
    core = RouterCore(RouterConfig(policy="round_robin", max_failover_attempts=0))
    core.apply_membership(fleet.membership())
    await core.start()
    try:
        stream = core.generate(RoutingRequest("doomed", MODEL, PROMPT, SamplingOptions(max_tokens=50)))
        first = await anext(stream)
        await fleet.workers[first.instance_id].server.stop(None)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert core.registry.fleet(MODEL).get(first.instance_id) is None, "the dead instance is routed around"
    finally:
        await core.close()


async def test_instance_removed_from_membership_mid_stream_fails_over(core: RouterCore, fleet: Fleet) -> None:
    """Membership dropping the instance under a live stream moves the request instead of cancelling it."""
    stream = core.generate(RoutingRequest("moved", MODEL, PROMPT, SamplingOptions(max_tokens=30)))
    first = await anext(stream)
    tokens = list(first.token_ids)
    others = [i for i in sorted(fleet.workers) if i != first.instance_id]
    core.apply_membership(fleet.membership(*others))
    instances = {first.instance_id}
    async for out in stream:
        tokens.extend(out.token_ids)
        instances.add(out.instance_id)
    assert tokens == expected_tokens(30)
    assert len(instances) == 2
    await eventually(lambda: fleet.engine_of(first.instance_id).running == 0)


async def test_membership_watch_sees_add_and_remove(
    router: router_pb2_grpc.RouterStub, core: RouterCore, fleet: Fleet
) -> None:
    """WatchInstances sends the current membership, then the full list after every change."""
    call = router.WatchInstances(router_pb2.WatchInstancesRequest(since_version=0))
    first = await call.read()
    assert first.version == core.membership.version
    assert sorted(i.instance_id for i in first.instances) == ["w0", "w1", "w2"]
    core.apply_membership(fleet.membership("w0", "w2"))
    removed = await call.read()
    assert sorted(i.instance_id for i in removed.instances) == ["w0", "w2"]
    await fleet.add("w3")
    core.apply_membership(fleet.membership())
    added = await call.read()
    assert sorted(i.instance_id for i in added.instances) == ["w0", "w1", "w2", "w3"]
    assert first.version < removed.version < added.version
    listed = await router.ListInstances(router_pb2.ListInstancesRequest())
    assert listed.version == added.version and len(listed.instances) == 4
    call.cancel()


async def test_load_reports_reach_the_registry(core: RouterCore, fleet: Fleet) -> None:
    """Each worker's pushed load reports land in the registry and in the per-instance gauges."""
    await eventually(lambda: all(s.report is not None for s in core.registry))
    for state in core.registry:
        assert state.report is not None and state.report.instance_id == state.instance_id
        assert state.report.kv_blocks_total == 100
    stream = core.generate(RoutingRequest("busy", MODEL, PROMPT, SamplingOptions(max_tokens=100)))
    first = await anext(stream)
    busy = core.registry.get(first.instance_id)
    assert busy is not None
    await eventually(lambda: busy.report is not None and busy.report.num_running == 1)
    gauge = metrics.REGISTRY.get_sample_value(
        "switchyard_instance_running_requests", {"instance_id": first.instance_id}
    )
    assert gauge == 1.0
    await stream.aclose()


async def test_worker_client_translates_errors(fleet: Fleet) -> None:
    """Worker errors come back as our tree: a bad request is InvalidRequestError, a dead worker
    EngineDeadError."""

    async with WorkerClient(fleet.workers["w0"].info.address, instance_id="w0") as client:
        assert (await client.get_info()).instance_id == "w0"
        with pytest.raises(InvalidRequestError):
            _ = [o async for o in client.generate(EngineRequest("bad", [], SamplingOptions(max_tokens=1)))]
        assert await client.abort("never-started") is False
    await fleet.workers["w1"].server.stop(None)
    async with WorkerClient(fleet.workers["w1"].info.address, instance_id="w1") as client:
        with pytest.raises(EngineDeadError):
            await client.get_info()


async def test_servers_report_healthy(fleet: Fleet) -> None:
    """The worker's grpc_health service answers SERVING."""
    async with grpc.aio.insecure_channel(fleet.workers["w0"].info.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="switchyard.v1.Worker"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
