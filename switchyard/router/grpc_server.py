"""The Router gRPC service: the router core for gateways other than the built-in HTTP one.

Each method converts protobuf to messages (``switchyard.api.wire``), calls ``RouterCore`` and
converts back; it has no routing logic of its own. Errors leave through the one table
(``wire.status_for_error``). As in the worker service, streaming handlers are coroutines that
``await context.write(...)``, so a client cancel cancels our own frame and the ``finally``
closes the core's stream at once, which aborts the request on its instance. Server options,
start-up and the error guard are shared with the worker service (``switchyard.api.server``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from pydantic import SecretStr

from switchyard import aio
from switchyard.api import wire
from switchyard.api.server import abort_on_error, bind_server, start_serving
from switchyard.api.v1 import router_pb2, router_pb2_grpc
from switchyard.messages import EngineOutput
from switchyard.router.core import RouterCore

__all__ = ["RouterServicer", "start_router_server"]

logger = logging.getLogger(__name__)

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
            async with abort_on_error(context, logger, "router RPC Generate %s", req.request_id):
                stream = self._core.generate(req)
                # Hot path: one conversion and one write per delta.
                async for out in stream:
                    await context.write(wire.output_to_pb(out))
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
        async with abort_on_error(context, logger, "router RPC WatchInstances"):
            if since == 0:
                current = self._core.membership
                await context.write(wire.membership_to_pb(current))
                since = current.version
            while True:
                membership = await self._core.wait_membership_change(since)
                await context.write(wire.membership_to_pb(membership))
                since = membership.version


async def start_router_server(
    core: RouterCore, *, host: str, port: int = 0, token: SecretStr | None = None
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start a Router server over ``core``; return it with the bound port.

    ``token``: every call but health checks must carry it (``api.server.TokenAuthInterceptor``);
    None leaves the service open (tests). ``switchyard serve`` passes the internal token.

    ``grpc_health.v1`` reports SERVING for ``""`` and ``switchyard.v1.Router``. Stop it with
    ``await server.stop(grace)`` before ``await core.close()``.
    """
    server, bound = bind_server(host, port, role="router", token=token)
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
    await start_serving(server, SERVICE_NAME)
    logger.info("router gRPC serving on %s:%s", host, bound)
    return server, bound
