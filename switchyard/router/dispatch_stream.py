"""``DispatchStream``: a router's one long-lived ``Worker.Dispatch`` call to one worker.

Why: starting a gRPC call costs the gateway ~650 µs of CPU per request, while a message on an
open stream costs ~240 µs (bench/README.md, router overhead). So every request to a worker
travels on one bidirectional call: a start (or abort) message goes out, and the worker's chunks
for every request come back on the same call, tagged by request id. ``WorkerClient.generate``
turns a :class:`RequestInbox` back into the per-request ``AsyncIterator[EngineOutput]`` the
router core and ``MovableStream`` always had, so nothing above it changes.

How it keeps the per-request semantics of one call per request:

* **Demultiplexing never waits for a consumer.** One reader task takes each message (the
  worker packs the chunks that are ready together into one) and hands each chunk to its
  request's inbox, which holds at most one pending chunk: a chunk arriving while one is
  pending is merged into it (``MergeFrom``: token ids appended, the latest finish state and
  error). A consumer that reads slowly costs memory for its own tokens only and never stalls
  the reader or the other requests on the stream.
* **One writer.** gRPC allows one write in flight per call, and a task cancelled inside
  ``write`` cancels the whole call, so only this stream's own writer task writes; starts and
  aborts are queued synchronously (an abort can therefore be sent from a ``finally`` that runs
  under cancellation or garbage collection), and whatever queued up during a write goes out
  in the next message, in order (a burst of requests costs a few messages, not one each).
* **Closing a request's iterator aborts it** on the worker (an abort message) unless its last
  chunk already arrived. The worker answers every abort of a running request with a terminal
  chunk, so the chunks still in flight for an aborted request are recognised and dropped, and
  its id can be reused on the stream at once (failover back to the same instance).
* **A stream that breaks fails every request on it with ``EngineDeadError``** (after the chunks
  that did arrive), as a broken call did, so the router core fails them over; the worker aborts
  whatever ran on it. The stream is then ``ended`` and ``WorkerClient`` opens a new one for the
  next request.
* **Per-request errors** arrive as a status on the request's last chunk and are translated by
  the client's one table (``request_error``), so they surface as the same error types, with
  the same messages, as a failed ``Generate`` call.
* **A request id already streaming here is refused** (``ConflictError``) before anything
  is sent: two requests under one id could not be told apart.

Cost (hot path). Per message the reader wakes once; per chunk in it, one dict lookup, two
field reads, and either completing the consumer's future or a merge; per consumed output the
consumer does one status check and one conversion (``wire.output_from_pb``). Per request: one
start action (sharing a message with those queued beside it), one inbox, one future per wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import grpc

from switchyard.api import wire
from switchyard.api.v1 import worker_pb2
from switchyard.errors import ConflictError, EngineDeadError, SwitchyardError
from switchyard.messages import EngineOutput, EngineRequest

__all__ = ["DispatchCall", "DispatchStream", "RequestInbox"]

logger = logging.getLogger(__name__)

MAX_ACTIONS_PER_REQUEST = 512
"""Actions packed into one message at most (a burst of starts goes out in a few messages)."""


class DispatchCall(Protocol):
    """The parts of a ``grpc.aio.StreamStreamCall`` that a dispatch stream uses (tests fake it)."""

    async def read(self) -> object: ...

    async def write(self, request: worker_pb2.DispatchRequest) -> None: ...

    def cancel(self) -> bool: ...


class RequestInbox:
    """One request's outputs arriving on a :class:`DispatchStream`; iterate with :meth:`next`."""

    __slots__ = ("_end", "_pending", "_stream", "_waiter", "request_id")

    def __init__(self, stream: DispatchStream, request_id: str) -> None:
        self.request_id = request_id
        self._stream = stream
        self._pending: worker_pb2.GenerateChunk | None = None  # merged chunks not yet consumed
        self._end: SwitchyardError | None = None  # raised once the pending chunk is consumed
        self._waiter: asyncio.Future[None] | None = None

    async def next(self) -> EngineOutput:
        """The next output delta (several merged when the consumer fell behind).

        Raises the request's error once its outputs are consumed: ``EngineDeadError`` when the
        stream broke, the translated worker error otherwise. Cancelling the wait does not end
        the request; :meth:`close` does.
        """
        while True:
            pb = self._pending
            if pb is not None:
                self._pending = None
                status = wire.chunk_status(pb)
                if status is not None:
                    self._end = self._stream.request_error(*status)
                    if not pb.token_ids:
                        raise self._end
                return wire.output_from_pb(pb)
            if self._end is not None:
                raise self._end
            waiter = self._waiter = self._stream.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Stop the request: abort it on the worker unless it already ended there (idempotent)."""
        self._stream.release(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class DispatchStream:
    """One Dispatch call: requests start on it and their outputs come back through inboxes."""

    def __init__(
        self,
        call: DispatchCall,
        *,
        instance_id: str,
        address: str,
        request_error: Callable[[grpc.StatusCode, str], SwitchyardError],
    ) -> None:
        """``request_error`` translates a request's status (code, details) into our error tree:
        the worker client's one table, shared with its other calls."""
        self.instance_id = instance_id
        self.address = address
        self.request_error = request_error
        self.loop = asyncio.get_running_loop()
        self._call = call
        self._inboxes: dict[str, RequestInbox] = {}
        self._aborted: dict[str, int] = {}  # request id -> aborts whose terminal chunk is still due
        self._outbox: deque[worker_pb2.DispatchAction] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._closing = False
        self._ended: str | None = None  # why the stream is over; None while it is usable
        self._reader = self.loop.create_task(self._read_loop())
        self._writer = self.loop.create_task(self._write_loop())

    def __repr__(self) -> str:
        state = f"ended: {self._ended}" if self._ended is not None else f"{len(self._inboxes)} requests"
        return f"DispatchStream({self.instance_id!r}, {state})"

    @property
    def ended(self) -> bool:
        """The call is over; requests must go on a new stream."""
        return self._ended is not None

    @property
    def num_requests(self) -> int:
        """Requests started here whose last chunk has not arrived (nor been given up on)."""
        return len(self._inboxes)

    def start(self, req: EngineRequest) -> RequestInbox:
        """Send ``req`` to the worker and return the inbox its outputs arrive in.

        Raises ``EngineDeadError`` on a stream that is over and ``ConflictError`` when a
        request with the same id is streaming here.
        """
        if self._ended is not None:
            raise self._dead()
        rid = req.request_id
        if rid in self._inboxes:
            raise ConflictError(
                f"request id {rid!r} is already streaming from instance {self.instance_id}",
                param="request_id",
            )
        inbox = self._inboxes[rid] = RequestInbox(self, rid)
        self._send(wire.dispatch_start_to_pb(req))
        return inbox

    def release(self, inbox: RequestInbox) -> None:
        """Forget ``inbox``; a request that has not ended on the worker is aborted there."""
        rid = inbox.request_id
        if self._inboxes.get(rid) is not inbox:
            return  # ended (its last chunk arrived, or the stream broke) or already released
        del self._inboxes[rid]
        if self._ended is None:
            self._aborted[rid] = self._aborted.get(rid, 0) + 1
            self._send(wire.dispatch_abort_to_pb(rid))

    async def close(self) -> None:
        """End the call; requests still on it fail with ``EngineDeadError`` (the worker aborts them)."""
        self._closing = True
        self._call.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    # -- reading ----------------------------------------------------------------------------

    def _deliver(self, chunk: worker_pb2.GenerateChunk) -> None:
        """Hand one chunk to its request's inbox (the reader's hot path: never blocks)."""
        rid = chunk.request_id
        last = chunk.finished or chunk.error_code != 0
        aborted = self._aborted
        if aborted and rid in aborted:
            # A chunk of a request we aborted; its terminal chunk (the worker's ack, or its own
            # end if it finished first) frees the id. Chunks of a later request under the same
            # id follow it on the stream, so they cannot be mistaken for these.
            if last:
                if aborted[rid] > 1:
                    aborted[rid] -= 1
                else:
                    del aborted[rid]
            return
        inbox = self._inboxes.get(rid)
        if inbox is None:
            logger.warning("instance %s sent a chunk for unknown request %r", self.instance_id, rid)
            return
        if last:
            del self._inboxes[rid]  # ended on the worker: nothing to abort
        pending = inbox._pending
        if pending is None:
            inbox._pending = chunk
            inbox._wake()
        else:
            pending.MergeFrom(chunk)

    async def _read_loop(self) -> None:
        deliver, read = self._deliver, self._call.read
        reason = "the worker ended the dispatch stream"
        cancelled = False
        try:
            while True:
                reply = await read()
                if reply is grpc.aio.EOF:
                    break
                for chunk in cast(worker_pb2.DispatchReply, reply).chunks:
                    deliver(chunk)
        except grpc.aio.AioRpcError as exc:
            reason = f"Dispatch: {exc.details() or exc.code().name}"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            reason = "Dispatch cut off"
            if cancelled:
                raise
        except Exception:
            logger.exception("dispatch stream to %s failed unexpectedly", self.instance_id)
            reason = "Dispatch failed"
        finally:
            self._end_all(reason)

    def _dead(self) -> EngineDeadError:
        if self._closing:
            return EngineDeadError(f"instance {self.instance_id} was removed (Dispatch cut off)")
        where = f"instance {self.instance_id} at {self.address}"
        return EngineDeadError(f"{where} is unavailable ({self._ended})")

    def _end_all(self, reason: str) -> None:
        """The call is over: every request still on it ends with ``EngineDeadError``."""
        self._ended = reason
        inboxes, self._inboxes = self._inboxes, {}
        self._aborted.clear()
        for inbox in inboxes.values():
            inbox._end = self._dead()  # one exception each: they are raised in different tasks
            inbox._wake()
        self._writer.cancel()
        if inboxes:  # the core logs each failover; this says they had one cause
            level = logging.INFO if self._closing else logging.WARNING
            logger.log(level, "instance %s: dispatch stream ended with %d requests on it (%s)",
                       self.instance_id, len(inboxes), reason)  # fmt: skip

    # -- writing ----------------------------------------------------------------------------

    def _send(self, msg: worker_pb2.DispatchAction) -> None:
        self._outbox.append(msg)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _write_loop(self) -> None:
        outbox, write, request_cls = self._outbox, self._call.write, worker_pb2.DispatchRequest
        try:
            while True:
                while outbox:
                    msg = request_cls()
                    msg.actions.extend(
                        outbox.popleft() for _ in range(min(len(outbox), MAX_ACTIONS_PER_REQUEST))
                    )
                    await write(msg)
                self._wake = self.loop.create_future()
                await self._wake
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call is over; the reader reports why
        except Exception:
            logger.exception("dispatch stream to %s: writing failed", self.instance_id)
            self._call.cancel()  # nobody may wait for a start that never went out
