"""A request id names one request: a second request under an id that is still streaming is refused.

At the router core (both front doors: the gateway and ``Router.Generate``) with
``ConflictError``, 409 over HTTP and ``ALREADY_EXISTS`` over gRPC; and on each worker, across
every call that can start a request there (two routers' Dispatch streams, ``Generate``), so a
client choosing its own ids cannot start a second request that the first one's abort,
suspend or migration would then hit. The running request is never disturbed by the refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.api import wire
from switchyard.api.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from switchyard.config import RouterConfig
from switchyard.errors import ConflictError, http_status
from switchyard.messages import EngineRequest, InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.router.grpc_server import start_router_server
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.scripted_engine import ScriptedEngine
from tests.helpers.waiting import eventually


class Worker:
    def __init__(self, engine: ScriptedEngine, server: grpc.aio.Server, info: InstanceInfo) -> None:
        self.engine, self.server, self.info = engine, server, info


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    engine = ScriptedEngine("w0", delay_s=0.005)

    def info(port: int) -> InstanceInfo:
        return InstanceInfo("w0", f"127.0.0.1:{port}", "m", engine="sim")

    server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
    yield Worker(engine, server, info(port))
    await server.stop(None)


def request(rid: str, max_tokens: int = 30) -> EngineRequest:
    return EngineRequest(rid, [5, 6, 7], SamplingOptions(max_tokens=max_tokens))


async def tokens_of(stream: AsyncIterator[object]) -> int:
    return sum([len(out.token_ids) async for out in stream])  # type: ignore[attr-defined]


async def test_a_worker_refuses_an_id_another_router_is_streaming(worker: Worker) -> None:
    """Two routers (two Dispatch streams) and a plain Generate call: the id is taken for all."""
    async with (
        WorkerClient(worker.info.address, instance_id="w0") as first,
        WorkerClient(worker.info.address, instance_id="w0") as second,
    ):
        running = first.generate(request("shared", 40))
        await anext(running)
        with pytest.raises(ConflictError, match="request id 'shared' is already running on instance w0"):
            await anext(second.generate(request("shared", 3)))
        async with grpc.aio.insecure_channel(worker.info.address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Generate(
                wire.engine_request_to_pb(request("shared", 3))
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
        assert raised.value.code() is grpc.StatusCode.ALREADY_EXISTS
        assert raised.value.details() == "request id 'shared' is already running on instance w0"
        assert await tokens_of(running) == 39, "the running request is untouched"
        assert [r.request_id for r in worker.engine.requests] == ["shared"]
        # Once it ended (and the engine released it), the id is free for anyone.
        await eventually(lambda: worker.engine.running == 0)
        assert await tokens_of(second.generate(request("shared", 3))) == 3


async def test_a_worker_refuses_a_dispatch_start_while_a_generate_call_runs_it(worker: Worker) -> None:
    async with grpc.aio.insecure_channel(worker.info.address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Generate(wire.engine_request_to_pb(request("g", 40)))
        await call.read()
        async with WorkerClient(worker.info.address, instance_id="w0") as client:
            with pytest.raises(ConflictError, match="already running on instance w0"):
                await anext(client.generate(request("g", 3)))
        chunks = []
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"


@pytest.fixture
async def core(worker: Worker) -> AsyncIterator[RouterCore]:
    core = RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02))
    core.apply_membership(Membership(1, (worker.info,)))
    await core.start()
    await eventually(lambda: core.ready)
    yield core
    await core.close()


def routing(rid: str, max_tokens: int = 30) -> RoutingRequest:
    return RoutingRequest(rid, "m", [5, 6, 7], SamplingOptions(max_tokens=max_tokens))


async def test_the_router_core_refuses_an_id_it_is_streaming(core: RouterCore) -> None:
    """Refused at once (the gateway answers 409 before any body); the first stream goes on, and
    the id is free again once it ended."""
    running = core.generate(routing("mine", 40))
    await anext(running)
    with pytest.raises(
        ConflictError, match="request id 'mine' is already streaming through this router"
    ) as raised:
        core.generate(routing("mine", 3))
    assert http_status(raised.value) == 409 and raised.value.param == "request_id"
    assert await tokens_of(running) == 39
    assert await tokens_of(core.generate(routing("mine", 3))) == 3


async def test_two_streams_created_before_either_ran_still_cannot_share_an_id(core: RouterCore) -> None:
    """``generate`` only checks; the id is taken when a stream first runs (a stream never
    iterated could not give it back), so the second of two streams created back to back fails
    on its first step, and the first is untouched."""
    a, b = core.generate(routing("race", 20)), core.generate(routing("race", 20))
    assert len((await anext(a)).token_ids) == 1
    with pytest.raises(ConflictError, match="'race' is already streaming"):
        await anext(b)
    assert await tokens_of(a) == 19


async def test_router_grpc_answers_already_exists_for_a_client_chosen_duplicate(core: RouterCore) -> None:
    server, port = await start_router_server(core, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            def route(max_tokens: int) -> router_pb2.RouteRequest:
                return router_pb2.RouteRequest(
                    request_id="client-id",
                    model="m",
                    prompt_token_ids=[5, 6, 7],
                    sampling=worker_pb2.SamplingParams(max_tokens=max_tokens),
                )

            first = stub.Generate(route(40))
            await first.read()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stub.Generate(route(3)):
                    pass
            assert raised.value.code() is grpc.StatusCode.ALREADY_EXISTS
            assert "request id 'client-id' is already streaming through this router" in raised.value.details()
            rest = 0
            while (chunk := await first.read()) is not grpc.aio.EOF:
                rest += len(chunk.token_ids)
            assert rest == 39
    finally:
        await server.stop(None)
