"""The Router gRPC service: the router core for gateways other than the built-in HTTP one.

Each method converts protobuf to messages (``switchyard.api.wire``), calls ``RouterCore`` and
converts back; it has no routing logic of its own. Errors leave through the one table
(``wire.status_for_error``). As in the worker service, streaming handlers are coroutines that
``await context.write(...)``, so a client cancel cancels our own frame and the ``finally``
closes the core's stream at once, which aborts the request on its instance.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchyard import aio
from switchyard.api import wire
from switchyard.api.v1 import router_pb2, router_pb2_grpc
from switchyard.messages import EngineOutput
from switchyard.router.core import RouterCore

__all__ = ["SERVER_OPTIONS", "RouterServicer", "start_router_server"]

logger = logging.getLogger(__name__)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Accept keepalive pings from clients that send them every >= 5 s (the same policy as the
    # worker service), rather than answering with GOAWAY "too_many_pings".
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)

SERVICE_NAME = "switchyard.v1.Router"


class RouterServicer(router_pb2_grpc.RouterServicer):  # type: ignore[misc]
    """Generate, ListInstances and WatchInstances over one ``RouterCore``."""

    def __init__(self, core: RouterCore) -> None:
        self._core = core

    async def Generate(self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext) -> None:
        """Route one request and stream its deltas; an empty request id gets a fresh one."""
        req = wire.routing_request_from_pb(request, request_id=request.request_id or uuid.uuid4().hex)
        stream: AsyncIterator[EngineOutput] | None = None
        try:
            stream = self._core.generate(req)
            # Hot path: one conversion and one write per delta.
            async for out in stream:
                await context.write(wire.output_to_pb(out))
        except Exception as exc:
            await _abort(context, exc, "Generate %s", req.request_id)
        finally:
            await aio.aclose(stream)  # a no-op when the stream ended; aborts it otherwise

    async def ListInstances(
        self, request: router_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InstanceList:
        """The current membership."""
        return wire.membership_to_pb(self._core.membership)

    async def WatchInstances(
        self, request: router_pb2.WatchInstancesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Stream the full membership on every change (first the current one when since is 0)."""
        since = request.since_version
        try:
            if since == 0:
                current = self._core.membership
                await context.write(wire.membership_to_pb(current))
                since = current.version
            while True:
                membership = await self._core.wait_membership_change(since)
                await context.write(wire.membership_to_pb(membership))
                since = membership.version
        except Exception as exc:
            await _abort(context, exc, "WatchInstances")


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, what: str, *args: object) -> NoReturn:
    """End the RPC with the status our one error table gives for ``exc``."""
    code, details = wire.status_for_error(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("router RPC " + what + " failed", *args)
    else:
        logger.info("router RPC " + what + " failed: %s", *args, exc)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def start_router_server(core: RouterCore, *, host: str, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start a Router server over ``core``; return it with the bound port.

    ``grpc_health.v1`` reports SERVING for ``""`` and ``switchyard.v1.Router``. Stop it with
    ``await server.stop(grace)`` before ``await core.close()``.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the router gRPC server to {host}:{port}")
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info("router gRPC serving on %s:%s", host, bound)
    return server, bound
