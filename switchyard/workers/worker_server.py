"""The Worker gRPC service: any ``Engine`` made reachable by routers.

One server per engine instance. It converts protobuf to messages and back (``switchyard.api.wire``)
and adds no logic of its own, so the vLLM engine, the simulator and test fakes all serve
through the same code. Errors leave through the one table (``wire.status_for_error``), by way
of the guard, server options and start-up shared with the router service (``switchyard.api.server``).

Streaming handlers are coroutines that ``await context.write(...)`` rather than async
generators that ``yield``: when a client cancels, gRPC cancels the handler task, and with a
coroutine the ``CancelledError`` always lands inside our own code (in the engine's
``__anext__`` or in ``write``), so the ``finally`` that aborts the engine request runs at once.
An async-generator handler suspended at ``yield`` would leave that cleanup to the garbage
collector.

``Dispatch`` is the routers' path: one long-lived call per router carrying many requests, whose
state lives in ``workers/dispatch_session.py``; ``Generate`` (one request per call) stays for
other clients, and ``AdmitMigrated`` keeps its own call per migrated request.

Every call that starts a request records it in the worker's ``RunningRequests``
(``workers/running.py``): an id already running here is refused, and the router id the call
carried owns the request, so ``Abort``, ``Snapshot``, ``Suspend`` and ``ReleaseSuspended``
from any other caller end ``PERMISSION_DENIED`` before the engine is touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable

import grpc
from pydantic import SecretStr

from switchyard.api import wire
from switchyard.api.auth import caller_id
from switchyard.api.server import abort_on_error, bind_server, start_serving
from switchyard.api.v1 import worker_pb2, worker_pb2_grpc
from switchyard.messages import EngineOutput, InstanceInfo
from switchyard.workers.dispatch_session import DispatchSession
from switchyard.workers.engine import Engine, release_stream
from switchyard.workers.running import RunningRequests

__all__ = [
    "DEFAULT_LOAD_INTERVAL_S",
    "WorkerServicer",
    "start_worker_server",
]

logger = logging.getLogger(__name__)

DEFAULT_LOAD_INTERVAL_S = 0.05
"""Load-report period when the subscriber asks for 0 (50 ms keeps routing fresh cheaply)."""

MIN_LOAD_INTERVAL_S = 0.005
"""Floor on the load-report period, so a bad request cannot make the worker spin."""

SERVICE_NAME = "switchyard.v1.Worker"


class WorkerServicer(worker_pb2_grpc.WorkerServicer):  # type: ignore[misc]
    """Serves one engine: Dispatch, Generate, Abort, StreamLoad, GetInstanceInfo and the migration steps."""

    def __init__(
        self, engine: Engine, info: InstanceInfo, *, load_interval_s: float = DEFAULT_LOAD_INTERVAL_S
    ) -> None:
        self._engine = engine
        self._info = info
        self._info_pb = wire.instance_info_to_pb(info)
        self._load_interval_s = load_interval_s
        self._running = RunningRequests(info.instance_id)  # ids running here, from any call

    @property
    def info(self) -> InstanceInfo:
        """The identity this worker reports (its address includes the bound port)."""
        return self._info

    async def Generate(self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Stream the engine's output deltas; a client cancel aborts the engine request."""
        req = wire.engine_request_from_pb(request)
        await self._serve_stream(lambda: self._engine.generate(req), req.request_id, context)

    async def Dispatch(
        self, request_iterator: AsyncIterable[worker_pb2.DispatchRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """A router's multiplexed stream: starts and aborts in, every request's chunks out.

        Whatever ends the call (the router cancels, the connection breaks, the server stops)
        aborts every request still running on it; a half-close lets them finish first.
        """
        session = DispatchSession(
            self._engine,
            self._info.instance_id,
            context.write,
            running=self._running,
            owner=caller_id(context.invocation_metadata()),
        )
        try:
            async for msg in request_iterator:
                for action in msg.actions:
                    session.handle(action)
            await session.finish()
        finally:
            await session.close()

    async def _serve_stream(
        self,
        start: Callable[[], AsyncIterator[EngineOutput]],
        request_id: str,
        context: grpc.aio.ServicerContext,
    ) -> None:
        instance_id = self._info.instance_id
        stream: AsyncIterator[EngineOutput] | None = None
        finished = claimed = False
        try:
            async with abort_on_error(context, logger, "worker RPC Generate %s", request_id):
                # ConflictError if the id already runs here; the caller's router id owns it.
                self._running.claim(request_id, context, caller_id(context.invocation_metadata()))
                claimed = True
                await self._running.settled(request_id, context)  # the owner's old one released
                stream = start()
                # Hot path: one conversion and one write per delta, nothing else.
                async for out in stream:
                    await context.write(wire.output_to_pb(out, instance_id=instance_id))
                    if out.finished:
                        finished = True
                        break
        finally:
            # Unfinished (client cancel, closed stream, error), releasing is the abort.
            if stream is not None:
                await release_stream(self._engine, stream, request_id, aborted=not finished)
            if claimed:
                self._running.release(request_id, context)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortReply:
        """Stop a request; ``found`` is False when it had already finished. Only its owner may."""
        async with abort_on_error(context, logger, "worker RPC Abort %s", request.request_id):
            self._running.check(request.request_id, caller_id(context.invocation_metadata()), "abort")
            self._running.ending(request.request_id)
            found = await self._engine.abort(request.request_id)
        return worker_pb2.AbortReply(found=found)

    async def StreamLoad(
        self, request: worker_pb2.LoadReportRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Push ``engine.load()`` every interval until the subscriber goes away."""
        interval = request.interval_ms / 1000 if request.interval_ms else self._load_interval_s
        interval = max(interval, MIN_LOAD_INTERVAL_S)
        instance_id = self._info.instance_id
        async with abort_on_error(context, logger, "worker RPC StreamLoad"):
            while True:
                await context.write(wire.load_report_to_pb(self._engine.load(), instance_id=instance_id))
                await asyncio.sleep(interval)

    # -- migration steps (router/migration.py drives them; the engine does the work) ---------

    async def Snapshot(
        self, request: worker_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.KvSnapshot:
        """The running request's full KV blocks as a pull ticket (it keeps decoding). Only its
        owner may take one: a ticket lets a destination pull the request's KV cache."""
        async with abort_on_error(context, logger, "worker RPC Snapshot %s", request.request_id):
            self._running.check(request.request_id, caller_id(context.invocation_metadata()), "snapshot")
            snap = await self._engine.snapshot(
                request.request_id,
                after_tokens=request.after_tokens,
                min_new_blocks=request.min_new_blocks or 1,
            )
        return wire.kv_snapshot_to_pb(snap)

    async def ShadowPull(
        self, request: worker_pb2.KvSnapshot, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ShadowPullReply:
        """Pull a snapshot's blocks into this engine's prefix cache."""
        async with abort_on_error(context, logger, "worker RPC ShadowPull %s", request.request_id):
            cached = await self._engine.shadow_pull(wire.kv_snapshot_from_pb(request))
        return worker_pb2.ShadowPullReply(num_cached_tokens=cached)

    async def Suspend(
        self, request: worker_pb2.SuspendRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.SuspendedRequest:
        """Stop the request, hold its blocks for a pull, return its authoritative state. Only its
        owner may, and only the owner may release the held blocks afterwards."""
        caller = caller_id(context.invocation_metadata())
        async with abort_on_error(context, logger, "worker RPC Suspend %s", request.request_id):
            self._running.check(request.request_id, caller, "suspend")
            suspended = await self._engine.suspend(request.request_id)
            self._running.suspended(request.request_id, caller)
        return wire.suspended_to_pb(suspended)

    async def AdmitMigrated(
        self, request: worker_pb2.SuspendedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Continue a suspended request here; streams like ``Generate``, and a cancel aborts it."""
        req = wire.suspended_from_pb(request)
        await self._serve_stream(lambda: self._engine.admit_migrated(req), req.request_id, context)

    async def ReleaseSuspended(
        self, request: worker_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseReply:
        """Free blocks held for a destination that will not pull them (the suspender only)."""
        async with abort_on_error(context, logger, "worker RPC ReleaseSuspended %s", request.request_id):
            self._running.check(request.request_id, caller_id(context.invocation_metadata()), "release")
            released = await self._engine.release_suspended(request.request_id)
            self._running.released(request.request_id)
        return worker_pb2.ReleaseReply(released=released)

    async def GetInstanceInfo(
        self, request: worker_pb2.InstanceInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.InstanceInfo:
        """Identity and static facts of this instance."""
        return self._info_pb


async def start_worker_server(
    engine: Engine,
    info_factory_or_info: InstanceInfo | Callable[[int], InstanceInfo],
    *,
    host: str,
    port: int = 0,
    load_interval_s: float = DEFAULT_LOAD_INTERVAL_S,
    token: SecretStr | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start a Worker server; return it with the bound port.

    ``token`` is the deployment's internal token: every call but health checks must carry it
    (``api.server.TokenAuthInterceptor``). None leaves the service open (tests, a worker on
    loopback in a trusted process); ``switchyard serve`` always passes one.

    ``info_factory_or_info`` is either the instance's ``InstanceInfo`` or a function of the
    bound port that builds it, since with ``port=0`` the address is known only after binding.
    ``grpc_health.v1`` reports SERVING for ``""`` and ``switchyard.v1.Worker`` once started.
    Stop it with ``await server.stop(grace)``; in-flight requests are then cancelled, which
    aborts them on the engine.
    """
    server, bound = bind_server(host, port, role="worker", token=token)
    info = info_factory_or_info(bound) if callable(info_factory_or_info) else info_factory_or_info
    worker_pb2_grpc.add_WorkerServicer_to_server(
        WorkerServicer(engine, info, load_interval_s=load_interval_s), server
    )
    await start_serving(server, SERVICE_NAME)
    logger.info("worker %s serving on %s:%s", info.instance_id, host, bound)
    return server, bound
