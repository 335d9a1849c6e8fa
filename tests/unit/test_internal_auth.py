"""The internal token: every gRPC service (router and workers) refuses calls without it.

Over real servers on loopback: a call without the token, with a wrong one or with a malformed
header ends ``UNAUTHENTICATED`` with a message saying which, before the servicer runs (the
engine never sees the request); health checks stay open; the router's own clients send the
token, so routing works end to end. The token never reaches a log line or a repr.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr, ValidationError

from switchyard.api import wire
from switchyard.api.auth import InternalCredentials, bearer_metadata, generate_token, read_token_file
from switchyard.api.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from switchyard.config import RouterConfig, ServeConfig
from switchyard.errors import AuthenticationError, CapacityError, ConfigError, EngineDeadError
from switchyard.messages import EngineRequest, InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.router.grpc_server import start_router_server
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.scripted_engine import ScriptedEngine
from tests.helpers.waiting import eventually

TOKEN = SecretStr("s3cret-internal-token-0123456789")
WRONG = SecretStr("not-the-internal-token-987654321")


class Worker:
    def __init__(self, engine: ScriptedEngine, server: grpc.aio.Server, info: InstanceInfo) -> None:
        self.engine, self.server, self.info = engine, server, info


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    engine = ScriptedEngine("w0", delay_s=0.005)

    def info(port: int) -> InstanceInfo:
        return InstanceInfo("w0", f"127.0.0.1:{port}", "m", engine="sim")

    server, port = await start_worker_server(
        engine, info, host="127.0.0.1", load_interval_s=0.02, token=TOKEN
    )
    yield Worker(engine, server, info(port))
    await server.stop(None)


def request(rid: str, max_tokens: int = 5) -> EngineRequest:
    return EngineRequest(rid, [5, 6, 7], SamplingOptions(max_tokens=max_tokens))


MISSING = "the worker gRPC service requires the internal token: send metadata 'authorization: Bearer <token>'"
CASES = [
    pytest.param((), MISSING, id="no-token"),
    pytest.param(bearer_metadata(WRONG), "the worker gRPC service: wrong internal token", id="wrong-token"),
    pytest.param(
        (("authorization", TOKEN.get_secret_value()),),
        "the worker gRPC service: the 'authorization' metadata must be 'Bearer <token>'",
        id="not-bearer",
    ),
]


@pytest.mark.parametrize(("metadata", "message"), CASES)
async def test_worker_rpcs_without_the_token_are_refused_before_the_engine(
    worker: Worker, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    """Unary (Abort), server-streaming (Generate) and bidirectional (Dispatch) calls alike."""
    async with grpc.aio.insecure_channel(worker.info.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        calls = {
            "Abort": lambda: stub.Abort(worker_pb2.AbortRequest(request_id="r"), metadata=metadata),
            "Generate": lambda: _drain(
                stub.Generate(wire.engine_request_to_pb(request("g")), metadata=metadata)
            ),
            "Dispatch": lambda: _dispatch_once(stub, metadata),
            "GetInstanceInfo": lambda: stub.GetInstanceInfo(
                worker_pb2.InstanceInfoRequest(), metadata=metadata
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call()
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED, name
            assert raised.value.details().startswith(message), name
    assert worker.engine.requests == [], "a refused call must not reach the engine"


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    async for _ in call:
        pass


async def _dispatch_once(stub: worker_pb2_grpc.WorkerStub, metadata: tuple[tuple[str, str], ...]) -> None:
    call = stub.Dispatch(metadata=metadata)
    await call.write(worker_pb2.DispatchRequest(actions=[wire.dispatch_start_to_pb(request("d"))]))
    await call.read()


async def test_health_stays_open_and_the_token_lets_calls_through(worker: Worker) -> None:
    async with grpc.aio.insecure_channel(worker.info.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = await worker_pb2_grpc.WorkerStub(channel).GetInstanceInfo(
            worker_pb2.InstanceInfoRequest(), metadata=bearer_metadata(TOKEN)
        )
        assert info.instance_id == "w0"


async def test_worker_client_sends_the_token_and_translates_a_refusal(worker: Worker) -> None:
    async with WorkerClient(worker.info.address, credentials=InternalCredentials(TOKEN)) as client:
        tokens = [t async for out in client.generate(request("ok", 4)) for t in out.token_ids]
        assert tokens == [8, 9, 10, 11]
        assert (await client.get_info()).instance_id == "w0"
    async with WorkerClient(worker.info.address, credentials=InternalCredentials(WRONG)) as client:
        with pytest.raises(AuthenticationError, match="wrong internal token"):
            await client.abort("ok")
        with pytest.raises(EngineDeadError, match="wrong internal token"):
            await anext(client.generate(request("refused")))
    assert [r.request_id for r in worker.engine.requests] == ["ok"]


async def test_router_service_requires_the_token_and_its_core_sends_it(worker: Worker) -> None:
    """A router whose core has the token routes to a worker that requires it; its own gRPC
    service refuses Generate and ListInstances without the token, and serves them with it."""
    core = RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02), internal_token=TOKEN)
    core.apply_membership(Membership(1, (worker.info,)))
    await core.start()
    server, port = await start_router_server(core, host="127.0.0.1", token=TOKEN)
    try:
        await eventually(lambda: core.ready)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            route = router_pb2.RouteRequest(
                model="m", prompt_token_ids=[5, 6, 7], sampling=worker_pb2.SamplingParams(max_tokens=3)
            )
            for call in (
                lambda: stub.ListInstances(router_pb2.ListInstancesRequest()),
                lambda: _drain(stub.Generate(route)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call()
                assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert raised.value.details().startswith(
                    "the router gRPC service requires the internal token"
                )
            listed = await stub.ListInstances(
                router_pb2.ListInstancesRequest(), metadata=bearer_metadata(TOKEN)
            )
            assert [i.instance_id for i in listed.instances] == ["w0"]
            chunks = [c async for c in stub.Generate(route, metadata=bearer_metadata(TOKEN))]
            assert [t for c in chunks for t in c.token_ids] == [8, 9, 10]
    finally:
        await server.stop(None)
        await core.close()


async def test_a_core_without_the_token_cannot_use_the_worker(worker: Worker) -> None:
    core = RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02))
    core.apply_membership(Membership(1, (worker.info,)))
    await core.start()
    try:
        await eventually(lambda: core.registry.membership.instances != ())
        with pytest.raises(CapacityError, match="no live instance"):
            async for _ in core.generate(RoutingRequest("x", "m", [5, 6, 7], SamplingOptions(max_tokens=2))):
                pass
        assert not core.ready, "a worker that refuses the load stream is never live"
    finally:
        await core.close()
    assert worker.engine.requests == []


async def test_the_token_never_reaches_logs_or_reprs(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = TOKEN.get_secret_value()
    async with grpc.aio.insecure_channel(worker.info.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await worker_pb2_grpc.WorkerStub(channel).Abort(
                worker_pb2.AbortRequest(request_id="r"),
                metadata=(("authorization", "Bearer " + secret[:-1]),),
            )
    client = WorkerClient(worker.info.address, credentials=InternalCredentials(TOKEN))
    await client.close()
    config = ServeConfig(internal_token=TOKEN)
    texts = [r.getMessage() for r in caplog.records]
    assert any("wrong internal token" in t for t in texts), "the refusal is logged"
    for text in [*texts, repr(client), repr(InternalCredentials(TOKEN)), repr(config), str(config)]:
        assert secret not in text and secret[:-1] not in text


def test_config_validates_the_token_without_quoting_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="16 to 4096 characters, got 5") as raised:
        ServeConfig(internal_token=SecretStr("short"))
    assert "short" not in str(raised.value).replace("input_value=SecretStr", "")
    with pytest.raises(ValidationError, match="printable ASCII without spaces"):
        ServeConfig(internal_token=SecretStr("has a space in it, sixteen+"))
    with pytest.raises(ValidationError, match="internal_token or internal_token_file, not both"):
        ServeConfig(internal_token=TOKEN, internal_token_file=tmp_path / "t")
    assert ServeConfig.model_validate({"internal_token": TOKEN.get_secret_value()}).internal_token == TOKEN


def test_token_file_is_read_stripped_and_errors_name_the_file_only(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN.get_secret_value() + "\n")
    assert read_token_file(path) == TOKEN
    path.write_text("tiny\n")
    with pytest.raises(ConfigError, match=f"internal token file {path}: .* got 4") as raised:
        read_token_file(path)
    assert "tiny" not in str(raised.value)
    with pytest.raises(ConfigError, match="cannot read the internal token file"):
        read_token_file(tmp_path / "missing")


def test_generated_tokens_are_long_and_fresh() -> None:
    a, b = generate_token(), generate_token()
    assert a != b and len(a.get_secret_value()) >= 43
    ServeConfig(internal_token=a)  # a generated token passes the config's own check
