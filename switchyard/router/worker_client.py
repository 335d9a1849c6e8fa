"""The router's client for one instance's Worker gRPC service.

This is the boundary where gRPC errors enter Switchyard, so they are translated here, once,
into our error tree (``_translate``), with ``raise ... from exc``; nothing above this module
sees a ``grpc`` type. The important distinction for the router is ``EngineDeadError`` (the
instance is gone: fail the request over) versus everything else (the request itself failed).

Requests go out on one long-lived, multiplexed ``Worker.Dispatch`` call per worker
(``router/dispatch_stream.py``), opened on first use and again after it breaks: a new call per
request cost the gateway ~650 µs of CPU, a message on an open stream ~240 µs. ``generate``
still returns one ``AsyncIterator[EngineOutput]`` per request, with the semantics a call per
request had: closing or cancelling it aborts the request on the worker, a stream that breaks
ends it with ``EngineDeadError``, and a request's own failure arrives as the same error, with
the same message, that a failed call carried (both go through ``_error``).

A channel closed under a live call (the instance left the membership) surfaces in gRPC as a
bare ``CancelledError``; that is reported as ``EngineDeadError`` so the request moves instead
of looking like a client cancel. ``AdmitMigrated`` and ``StreamLoad`` keep a call each.

Every call carries the client's ``InternalCredentials`` as metadata (the deployment's internal
token), built once per client; a worker that refuses them answers ``UNAUTHENTICATED``, which
becomes ``AuthenticationError`` here, and on the Dispatch stream ends its requests like any
broken stream (the message names the cause).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator
from types import TracebackType

import grpc

from switchyard.api import wire
from switchyard.api.auth import InternalCredentials
from switchyard.api.v1 import worker_pb2, worker_pb2_grpc
from switchyard.errors import (
    GRPC_CODE_TO_ERROR,
    EngineDeadError,
    EngineRequestError,
    SwitchyardError,
)
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    InstanceInfo,
    KvSnapshot,
    LoadReport,
    SuspendedRequest,
)
from switchyard.router.dispatch_stream import DispatchStream

__all__ = ["CHANNEL_OPTIONS", "UNARY_TIMEOUT_S", "WorkerClient"]

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Ping idle connections every 10 s and give up after 5 s without an answer, so a worker
    # that vanished without closing its socket (node loss, partition) is noticed within ~15 s
    # and its requests fail over. Workers permit this rate (api.server.SERVER_OPTIONS).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a worker restart; the load stream retries on its own schedule.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # gRPC's transparent retries could replay a Generate; the router decides about resubmission.
    ("grpc.enable_retries", 0),
)

UNARY_TIMEOUT_S = 5.0
"""Deadline of Abort and GetInstanceInfo: both are in-memory operations on the worker."""

MIGRATION_STEP_TIMEOUT_S = 30.0
"""Deadline of one migration step (a pull waits for a KV transfer); the coordinator's own
per-step deadline is usually shorter."""

# Codes whose meaning differs from the shared reverse table when they come from a worker:
# a CANCELLED we did not ask for means the server went away mid-call, and a missed deadline
# on an in-memory call means the worker stopped answering.
_WORKER_CODE_TO_ERROR: dict[str, type[SwitchyardError]] = {
    **GRPC_CODE_TO_ERROR,
    "CANCELLED": EngineDeadError,
    "DEADLINE_EXCEEDED": EngineDeadError,
}


class WorkerClient:
    """One channel to one instance; every call translates gRPC failures into our errors."""

    def __init__(
        self, address: str, *, instance_id: str = "", credentials: InternalCredentials | None = None
    ) -> None:
        self.address = address
        self.instance_id = instance_id or address
        self._metadata = (credentials or InternalCredentials()).metadata()
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._dispatch: DispatchStream | None = None
        self.dispatch_streams_opened = 0
        """How many Dispatch calls this client has opened (1 while none broke)."""
        self._closed = False

    @classmethod
    def for_instance(
        cls, info: InstanceInfo, *, credentials: InternalCredentials | None = None
    ) -> WorkerClient:
        """The default connector: a client for the address membership publishes."""
        return cls(info.address, instance_id=info.instance_id, credentials=credentials)

    def __repr__(self) -> str:
        return f"WorkerClient({self.instance_id!r} at {self.address!r})"

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream ``req``'s output deltas; closing or cancelling the iterator aborts the request.

        Raises ``EngineDeadError`` when the instance is unreachable or goes away mid-stream, and
        ``ConflictError`` when a request with the same id is streaming from this instance (on
        this client's stream, or started there by another client).
        An async generator (not the inbox itself) so that an iterator dropped without being
        closed still aborts its request when it is collected.
        """
        inbox = self._dispatch_stream().start(req)
        try:
            next_output = inbox.next
            # Hot path: the inbox's wait is the only await; several deltas may come merged.
            while True:
                out = await next_output()
                yield out
                if out.finished:
                    return
        finally:
            inbox.close()  # a no-op once the request ended; otherwise the worker aborts it

    def _dispatch_stream(self) -> DispatchStream:
        """The open Dispatch call, opened now if there is none or the last one broke."""
        stream = self._dispatch
        if stream is None or stream.ended:
            if self._closed:
                raise EngineDeadError(f"instance {self.instance_id} was removed")
            stream = self._dispatch = DispatchStream(
                self._stub.Dispatch(metadata=self._metadata),
                instance_id=self.instance_id,
                address=self.address,
                request_error=lambda code, details: self._error(code.name, details, "Dispatch"),
            )
            self.dispatch_streams_opened += 1
        return stream

    async def abort(self, request_id: str) -> bool:
        """Ask the worker to stop a request; False when it had already finished."""
        with self._translate("Abort"):
            reply = await self._stub.Abort(
                worker_pb2.AbortRequest(request_id=request_id),
                timeout=UNARY_TIMEOUT_S,
                metadata=self._metadata,
            )
        return bool(reply.found)

    async def stream_load(self, interval_s: float) -> AsyncGenerator[LoadReport, None]:
        """Subscribe to the worker's load reports, one every ``interval_s`` seconds."""
        call = self._stub.StreamLoad(
            worker_pb2.LoadReportRequest(interval_ms=max(1, round(interval_s * 1000))),
            metadata=self._metadata,
        )
        try:
            with self._translate("StreamLoad"):
                async for pb in call:
                    yield wire.load_report_from_pb(pb)
        finally:
            call.cancel()

    # -- migration steps: the coordinator's MigrationPeer over gRPC ------------------------------

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        """The running request's full KV blocks as a pull ticket."""
        req = worker_pb2.SnapshotRequest(
            request_id=request_id, after_tokens=after_tokens, min_new_blocks=min(min_new_blocks, 2**32 - 1)
        )
        with self._translate("Snapshot"):
            pb = await self._stub.Snapshot(req, timeout=MIGRATION_STEP_TIMEOUT_S, metadata=self._metadata)
        return wire.kv_snapshot_from_pb(pb)

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        """Have the worker pull a snapshot's blocks into its prefix cache."""
        with self._translate("ShadowPull"):
            pb = await self._stub.ShadowPull(
                wire.kv_snapshot_to_pb(snapshot), timeout=MIGRATION_STEP_TIMEOUT_S, metadata=self._metadata
            )
        return int(pb.num_cached_tokens)

    async def suspend(self, request_id: str) -> SuspendedRequest:
        """Stop the request with its blocks held; its Generate stream ends with ABORT."""
        with self._translate("Suspend"):
            pb = await self._stub.Suspend(
                worker_pb2.SuspendRequest(request_id=request_id),
                timeout=MIGRATION_STEP_TIMEOUT_S,
                metadata=self._metadata,
            )
        return wire.suspended_from_pb(pb)

    async def admit_migrated(self, req: SuspendedRequest) -> AsyncGenerator[EngineOutput, None]:
        """Continue a suspended request on this worker; streams like :meth:`generate`."""
        call = self._stub.AdmitMigrated(wire.suspended_to_pb(req), metadata=self._metadata)
        try:
            with self._translate("AdmitMigrated"):
                async for chunk in call:
                    yield wire.output_from_pb(chunk)
        finally:
            call.cancel()

    async def release_suspended(self, request_id: str) -> bool:
        """Free blocks held for a pull that will not come."""
        with self._translate("ReleaseSuspended"):
            reply = await self._stub.ReleaseSuspended(
                worker_pb2.ReleaseRequest(request_id=request_id),
                timeout=UNARY_TIMEOUT_S,
                metadata=self._metadata,
            )
        return bool(reply.released)

    async def current_load(self) -> LoadReport:
        """One fresh load report (the first of a short-lived subscription)."""
        stream = self.stream_load(0.05)
        try:
            async for report in stream:
                return report
        finally:
            await stream.aclose()
        raise EngineDeadError(f"instance {self.instance_id} sent no load report")

    async def get_info(self) -> InstanceInfo:
        """The instance's identity as the worker itself reports it."""
        with self._translate("GetInstanceInfo"):
            pb = await self._stub.GetInstanceInfo(
                worker_pb2.InstanceInfoRequest(), timeout=UNARY_TIMEOUT_S, metadata=self._metadata
            )
        return wire.instance_info_from_pb(pb)

    async def close(self) -> None:
        """Close the channel; streams still open on it end with ``EngineDeadError``."""
        self._closed = True
        if self._dispatch is not None:
            await self._dispatch.close()
        await self._channel.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _error(self, code: str, details: str, method: str) -> SwitchyardError:
        """The one gRPC-to-Switchyard translation table for a worker's status (``code`` is a
        ``grpc.StatusCode`` name): a failed call's, or one request's on the Dispatch stream."""
        err_cls = _WORKER_CODE_TO_ERROR.get(code, EngineRequestError)
        if err_cls is EngineDeadError:
            where = f"instance {self.instance_id} at {self.address}"
            return err_cls(f"{where} is unavailable ({method}: {details})")
        return err_cls(details)

    @contextlib.contextmanager
    def _translate(self, method: str) -> Iterator[None]:
        """Calls to a worker raise our errors (``_error``) instead of gRPC's."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            raise self._error(code, exc.details() or code, method) from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._closed and task is not None and task.cancelling() == 0:
                # Nobody cancelled us: our own channel was closed under the call.
                raise EngineDeadError(f"instance {self.instance_id} was removed ({method} cut off)") from exc
            raise
