"""``switchyard.api.server``: the error guard every RPC uses, and the shared server start-up.

The guard is checked twice: against a recording context (the status, the details and the log
line, per error class), and over a real channel, through a worker RPC whose engine raises, so
a client sees exactly the status code and message the one table gives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard.api.server import SERVER_OPTIONS, abort_on_error, bind_server, start_serving
from switchyard.api.v1 import worker_pb2, worker_pb2_grpc
from switchyard.errors import (
    AuthenticationError,
    CapacityError,
    ConflictError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    MigrationError,
    ModelNotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
)
from switchyard.messages import InstanceInfo
from switchyard.workers.engine import Engine
from switchyard.workers.worker_server import start_worker_server

# What each error class has always become on the wire (errors._GRPC_CODE, via wire.status_for_error).
CASES: list[tuple[Exception, grpc.StatusCode, str]] = [
    (ModelNotFoundError("no model 'x'"), grpc.StatusCode.NOT_FOUND, "no model 'x'"),
    (RequestTooLargeError("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"),
    (ConflictError("id in use"), grpc.StatusCode.ALREADY_EXISTS, "id in use"),
    (AuthenticationError("bad key"), grpc.StatusCode.UNAUTHENTICATED, "bad key"),
    (PermissionDeniedError("not yours"), grpc.StatusCode.PERMISSION_DENIED, "not yours"),
    (InvalidRequestError("bad field"), grpc.StatusCode.INVALID_ARGUMENT, "bad field"),
    (ContextLengthError("too long"), grpc.StatusCode.INVALID_ARGUMENT, "too long"),
    (CapacityError("busy"), grpc.StatusCode.UNAVAILABLE, "busy"),
    (EngineDeadError("gone"), grpc.StatusCode.UNAVAILABLE, "gone"),
    (MigrationError("refused"), grpc.StatusCode.FAILED_PRECONDITION, "refused"),
    (EngineRequestError("failed"), grpc.StatusCode.INTERNAL, "failed"),
    (KeyError("/secret/path"), grpc.StatusCode.INTERNAL, "internal error"),  # a bug: details hidden
]
IDS = [type(case[0]).__name__ for case in CASES]


class Aborted(Exception):
    """What the recording context raises from ``abort``, as gRPC's own context does."""


class RecordingContext:
    def __init__(self) -> None:
        self.aborted: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append((code, details))
        raise Aborted


log = logging.getLogger("test.rpc")


@pytest.mark.parametrize(("exc", "code", "details"), CASES, ids=IDS)
async def test_an_error_inside_ends_the_rpc_with_its_status(
    exc: Exception, code: grpc.StatusCode, details: str, caplog: pytest.LogCaptureFixture
) -> None:
    context = RecordingContext()
    caplog.set_level(logging.INFO, logger="test.rpc")
    with pytest.raises(Aborted):
        async with abort_on_error(cast(Any, context), log, "worker RPC Abort %s", "r1"):
            raise exc
    assert context.aborted == [(code, details)]
    (record,) = caplog.records
    if code is grpc.StatusCode.INTERNAL:  # an engine failure or a bug: with the traceback
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert record.getMessage() == "worker RPC Abort r1 failed"
    else:  # the caller's problem or a known condition: one info line
        assert record.levelno == logging.INFO and record.exc_info is None
        assert record.getMessage() == f"worker RPC Abort r1 failed: {exc}"


async def test_success_and_cancellation_pass_through_untouched() -> None:
    context = RecordingContext()
    async with abort_on_error(cast(Any, context), log, "worker RPC StreamLoad"):
        pass
    with pytest.raises(asyncio.CancelledError):
        async with abort_on_error(cast(Any, context), log, "worker RPC StreamLoad"):
            raise asyncio.CancelledError
    assert context.aborted == []


class FailingEngine:
    """Just enough of an ``Engine`` for the worker's ``Abort`` RPC: it raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def abort(self, request_id: str) -> bool:
        raise self.error


@pytest.mark.parametrize(("exc", "code", "details"), CASES, ids=IDS)
async def test_a_client_sees_the_status_and_message(
    exc: Exception, code: grpc.StatusCode, details: str
) -> None:
    info = InstanceInfo("w0", "127.0.0.1:0", "m")
    server, port = await start_worker_server(cast(Engine, FailingEngine(exc)), info, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await worker_pb2_grpc.WorkerStub(channel).Abort(worker_pb2.AbortRequest(request_id="r1"))
    finally:
        await server.stop(None)
    assert (raised.value.code(), raised.value.details()) == (code, details)


async def test_bind_then_start_serves_health_for_the_service() -> None:
    server, port = bind_server("127.0.0.1", 0, role="test")
    assert port > 0
    await start_serving(server, "switchyard.v1.Test")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "switchyard.v1.Test"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises((OSError, RuntimeError)):  # never share a port (so_reuseport 0)
            bind_server("127.0.0.1", port, role="test")
    finally:
        await server.stop(None)
    assert ("grpc.so_reuseport", 0) in SERVER_OPTIONS
