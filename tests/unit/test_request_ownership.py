"""Only the router that dispatched a request may abort, suspend, snapshot or release it.

Two routers with the same internal token and different router ids share one worker. Router B
calling ``Abort``, ``Snapshot``, ``Suspend`` or ``ReleaseSuspended`` on router A's request gets
``PERMISSION_DENIED`` (``PermissionDeniedError``) and the engine is never asked, so A's client
keeps streaming instead of seeing ``finish_reason: "abort"``. Router A itself may do all four.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from pydantic import SecretStr

from switchyard.api import wire
from switchyard.api.auth import InternalCredentials, bearer_metadata, caller_id
from switchyard.api.v1 import worker_pb2, worker_pb2_grpc
from switchyard.config import RouterConfig
from switchyard.errors import PermissionDeniedError, http_status
from switchyard.messages import (
    EngineRequest,
    InstanceInfo,
    KvSnapshot,
    Membership,
    RoutingRequest,
    SamplingOptions,
    SuspendedRequest,
)
from switchyard.router.core import RouterCore
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.running import MAX_SUSPENDED, RunningRequests
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.scripted_engine import ScriptedEngine
from tests.helpers.waiting import eventually

TOKEN = SecretStr("shared-internal-token-0123456789")
A = InternalCredentials(TOKEN, router_id="router-a")
B = InternalCredentials(TOKEN, router_id="router-b")


class MigratableEngine(ScriptedEngine):
    """A scripted engine that also answers the migration steps, recording each call."""

    def __init__(self) -> None:
        super().__init__("w0", delay_s=0.005)
        self.calls: list[tuple[str, str]] = []

    async def abort(self, request_id: str) -> bool:
        self.calls.append(("abort", request_id))
        return await super().abort(request_id)

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        self.calls.append(("snapshot", request_id))
        return KvSnapshot(request_id, "w0", (), {})

    async def suspend(self, request_id: str) -> SuspendedRequest:
        self.calls.append(("suspend", request_id))
        await super().abort(request_id)
        return SuspendedRequest(request_id, "w0", (5, 6, 7), (8,), SamplingOptions(max_tokens=40), {"t": 1})

    async def release_suspended(self, request_id: str) -> bool:
        self.calls.append(("release", request_id))
        return True


@pytest.fixture
async def worker() -> AsyncIterator[tuple[MigratableEngine, str]]:
    engine = MigratableEngine()

    def info(port: int) -> InstanceInfo:
        return InstanceInfo("w0", f"127.0.0.1:{port}", "m", engine="sim")

    server, port = await start_worker_server(
        engine, info, host="127.0.0.1", load_interval_s=0.02, token=TOKEN
    )
    yield engine, info(port).address
    await server.stop(None)


def request(rid: str, max_tokens: int = 40) -> EngineRequest:
    return EngineRequest(rid, [5, 6, 7], SamplingOptions(max_tokens=max_tokens))


async def test_another_router_cannot_abort_suspend_snapshot_or_release(
    worker: tuple[MigratableEngine, str],
) -> None:
    engine, address = worker
    async with WorkerClient(address, credentials=A) as a, WorkerClient(address, credentials=B) as b:
        victim = a.generate(request("victim"))
        await anext(victim)
        for name, step in {
            "abort": lambda: b.abort("victim"),
            "snapshot": lambda: b.snapshot("victim"),
            "suspend": lambda: b.suspend("victim"),
            "release": lambda: b.release_suspended("victim"),
        }.items():
            with pytest.raises(
                PermissionDeniedError, match=f"cannot {name} request 'victim' on instance w0"
            ) as e:
                await step()
            assert "router-a" not in e.value.message and "router-b" not in e.value.message
        assert engine.calls == [], "a refused call must not reach the engine"
        outs = [out async for out in victim]
        assert outs[-1].finish_reason is not None and outs[-1].finish_reason.value == "length"
        assert sum(len(o.token_ids) for o in outs) == 39, "the victim streamed to its end"


async def test_the_owner_may_do_all_four_and_only_it_releases_what_it_suspended(
    worker: tuple[MigratableEngine, str],
) -> None:
    engine, address = worker
    async with WorkerClient(address, credentials=A) as a, WorkerClient(address, credentials=B) as b:
        mine = a.generate(request("mine"))
        await anext(mine)
        await a.snapshot("mine")
        await a.suspend("mine")
        assert [o.finish_reason.value for o in [o async for o in mine] if o.finish_reason] == ["abort"]
        await eventually(lambda: engine.running == 0)
        with pytest.raises(PermissionDeniedError, match="cannot release request 'mine'"):
            await b.release_suspended("mine")  # its stream ended; the suspender is remembered
        assert await a.release_suspended("mine")
        assert await b.release_suspended("mine"), "released: no owner is left, the engine answers"
        other = a.generate(request("other"))
        await anext(other)
        assert await a.abort("other")
        await other.aclose()
    assert engine.calls[:4] == [
        ("snapshot", "mine"),
        ("suspend", "mine"),
        ("release", "mine"),
        ("release", "mine"),
    ]
    assert ("abort", "other") in engine.calls


async def test_requests_started_by_generate_calls_belong_to_their_caller(
    worker: tuple[MigratableEngine, str],
) -> None:
    """A plain Generate client without a router id owns its request as "": a router cannot
    abort it, and it can abort its own."""
    engine, address = worker
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        call = stub.Generate(wire.engine_request_to_pb(request("anon")), metadata=bearer_metadata(TOKEN))
        await call.read()
        async with WorkerClient(address, credentials=A) as a:
            with pytest.raises(PermissionDeniedError):
                await a.abort("anon")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Suspend(worker_pb2.SuspendRequest(request_id="anon"))  # no token at all
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert engine.calls == []
        reply = await stub.Abort(worker_pb2.AbortRequest(request_id="anon"), metadata=bearer_metadata(TOKEN))
        assert reply.found and engine.calls == [("abort", "anon")]
        call.cancel()


async def test_each_router_core_has_its_own_id_and_sends_it(worker: tuple[MigratableEngine, str]) -> None:
    """Two routers: distinct random ids; a core's own request is owned by its id, so the other
    core's clients are refused, while the core itself migrates its request (snapshot, suspend)."""
    engine, address = worker
    info = InstanceInfo("w0", address, "m", engine="sim")
    cores = [
        RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02), internal_token=TOKEN)
        for _ in range(2)
    ]
    for core in cores:
        core.apply_membership(Membership(1, (info,)))
        await core.start()
    try:
        one, two = cores
        assert one.router_id != two.router_id and len(one.router_id) == 32
        await eventually(lambda: one.ready and two.ready)
        stream = one.generate(RoutingRequest("r1", "m", [5, 6, 7], SamplingOptions(max_tokens=40)))
        await anext(stream)
        with pytest.raises(PermissionDeniedError):
            await two._links["w0"].abort("r1")
        await one._links["w0"].snapshot("r1")
        assert ("snapshot", "r1") in engine.calls and ("abort", "r1") not in engine.calls
        await stream.aclose()
    finally:
        for core in cores:
            await core.close()


def test_owner_bookkeeping() -> None:
    running = RunningRequests("w0")
    holder = object()
    running.claim("r", holder, "a")
    running.check("r", "a", "abort")
    with pytest.raises(PermissionDeniedError) as raised:
        running.check("r", "b", "abort")
    assert http_status(raised.value) == 403
    running.check("unknown", "b", "abort")  # unknown ids are the engine's to answer
    running.release("r", holder)
    running.check("r", "b", "abort")
    for i in range(MAX_SUSPENDED + 1):
        running.suspended(f"s{i}", "a")
    running.check("s0", "b", "release")  # the oldest record fell out
    with pytest.raises(PermissionDeniedError):
        running.check(f"s{MAX_SUSPENDED}", "b", "release")
    assert caller_id((("x-switchyard-router-id", "x" * 500),)) == "x" * 128
    assert caller_id(None) == ""
