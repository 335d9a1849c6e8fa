"""Streaming plumbing of the gateway: the one error translation point, SSE bodies, aborts.

Every failure leaves the gateway through :func:`error_payload` (OpenAI's ``{"error": ...}``
shape, status from :func:`switchyard.errors.http_status`), the only place that body is built:
API and admin endpoints, SSE error events and Starlette's own 404/405 alike. Streams from the
router core are always closed through :func:`close_stream`, shielded from cancellation,
because closing the core stream is what aborts the engine request: a client that disconnects,
a stop string, or ``max_tokens`` reached early all end up there.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from switchyard import aio
from switchyard.errors import (
    AuthenticationError,
    CapacityError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    HeadersTooLargeError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    SwitchyardError,
    http_status,
)
from switchyard.messages import EngineOutput
from switchyard.router.gateway.detokenizer import OutputDecoder
from switchyard.router.gateway.responses import DONE, ChunkEncoder, usage

logger = logging.getLogger(__name__)

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DISCONNECT_EXTENSION",
    "SHUTTING_DOWN",
    "EventStream",
    "StopSignal",
    "close_stream",
    "collect",
    "disconnect_future",
    "error_event",
    "error_payload",
    "error_response",
    "events",
    "until_disconnect",
    "usage_of",
]

#: Longest wait for the core to abort a request on close; a hung core cannot hang a handler.
CLOSE_TIMEOUT_S = 10.0


# -- the one error translation point --------------------------------------------------------

_ERROR_CODES: tuple[tuple[type[SwitchyardError], str], ...] = (
    (ContextLengthError, "context_length_exceeded"),
    (ModelNotFoundError, "model_not_found"),
    (AuthenticationError, "invalid_api_key"),
    (RequestTooLargeError, "request_too_large"),
    (HeadersTooLargeError, "request_header_fields_too_large"),
    (RequestTimeoutError, "request_timeout"),
    (CapacityError, "capacity_exceeded"),
    (EngineDeadError, "engine_unavailable"),
)


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for any exception: the only place that body is built.

    Our errors keep their message, ``param`` and ``error_type``, with the status of
    ``http_status``. Starlette's own ``HTTPException`` (no such route, wrong method) keeps its
    status as an ``invalid_request_error``, a status our tree has no class for. Anything else
    is a bug: logged, and a 500 that does not leak its text.
    """
    err: SwitchyardError
    if isinstance(exc, HTTPException):
        err, status = InvalidRequestError(exc.detail), exc.status_code
    elif isinstance(exc, SwitchyardError):
        err, status = exc, http_status(exc)
        if status >= 500:
            logger.warning("request failed: %s: %s", type(err).__name__, err.message)
    else:
        logger.error("unexpected error in the gateway", exc_info=exc)
        err = EngineRequestError("internal server error")
        status = http_status(err)
    code = next((c for cls, c in _ERROR_CODES if isinstance(err, cls)), None)
    body = {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": code}}
    return status, body


def error_response(exc: BaseException) -> Response:
    """The error as a JSON response. A 413 or 408 may leave the request's body unread, so it
    closes the connection (``server.py`` lingers so the client reads it rather than a reset)."""
    status, body = error_payload(exc)
    headers = _ERROR_HEADERS.get(status)
    return JSONResponse(body, status_code=status, headers=headers)


_CLOSE = {"Connection": "close"}
_ERROR_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 408: _CLOSE, 413: _CLOSE}


def error_event(exc: BaseException) -> bytes:
    return b"data: " + json.dumps(error_payload(exc)[1]).encode() + b"\n\n"


async def close_stream(stream: object) -> None:
    """``aclose()`` a stream even while our task is being cancelled (client disconnect)."""
    if getattr(stream, "ag_frame", True) is None:
        return  # an async generator that has run to its end: closing it would do nothing
    with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        try:
            await aio.aclose(stream)
        except Exception as exc:  # the request is over either way; log, don't mask
            logger.warning("closing a core stream failed: %r", exc)


class StopSignal(asyncio.Event):
    """The gateway's "end open requests now" signal, set once by ``server.stop_gateway``.

    Every open request watches it. ``Event.wait()`` needs a task per waiter; :meth:`future`
    gives a plain future instead, which costs one set insert and no task switch per request.
    """

    def __init__(self) -> None:
        super().__init__()
        self._futures: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        super().set()
        for fut in self._futures:
            if not fut.done():
                fut.set_result(None)
        self._futures.clear()

    def future(self) -> asyncio.Future[None]:
        """A future resolved when the signal is set; cancel it when no longer interested."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.is_set():
            fut.set_result(None)
        else:
            self._futures.add(fut)
            fut.add_done_callback(self._futures.discard)
        return fut


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


#: ASGI scope extension (``scope["extensions"]``) the gateway's connection protocol
#: (``connection.py``) provides: a callable returning a future that resolves when the client's
#: connection is lost. It lets :func:`until_disconnect` watch without a task.
DISCONNECT_EXTENSION = "switchyard.disconnect_future"


def disconnect_future(scope: Scope) -> asyncio.Future[None] | None:
    """A future resolved when the client of ``scope`` disconnects; None when the server cannot tell."""
    make = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    return make() if make is not None else None


async def until_disconnect(
    receive: Receive,
    work: Callable[[], Coroutine[Any, Any, None]],
    stopping: StopSignal,
    disconnected: asyncio.Future[None] | None = None,
) -> str:
    """Run ``work`` to the end unless the client disconnects or the gateway stops first.

    Returns ``"done"``, ``"disconnected"`` or ``"stopping"``; in the last two cases ``work``
    was cancelled, and its cleanup (closing the core stream, which aborts the engine request)
    has finished before this returns. Starlette does not cancel a handler whose client went
    away, and cancels a streaming body only when it notices; this is how both paths notice at
    once. ``work``'s own exception is re-raised as is.

    ``work`` runs in the calling task; the disconnect and the stop signal's future cancel that
    task when they fire, and the cancellation is taken back (``uncancel``) here. Cheap on
    purpose, since every request pays it: the anyio task group this first was cost about
    300 µs of CPU per request, and a second task for the work plus ``asyncio.wait`` another
    ~40 µs (both measured). The disconnect comes from ``disconnected`` (see
    :func:`disconnect_future`) when the server provides it; otherwise a watcher task waits on
    ``receive()`` for ``http.disconnect``, which costs about 50 µs more per request (its
    creation, a ``receive()`` future, and a task step to cancel it; measured in-process). A
    cancellation from outside (the caller's own) is re-raised.
    """
    task = asyncio.current_task()
    assert task is not None
    why: list[str] = []  # the first reason to stop; "done" once work() has returned

    def interrupt(reason: str) -> None:
        if not why:
            why.append(reason)
            task.cancel()

    def watched(t: asyncio.Task[None]) -> None:
        if t.cancelled():
            return
        if t.exception() is not None:  # retrieved here, so asyncio does not warn about it later
            logger.debug("receive() failed while watching for a disconnect: %r", t.exception())
        interrupt("disconnected")

    watcher: asyncio.Future[None]
    if disconnected is not None:
        watcher = disconnected
        watcher.add_done_callback(lambda f: None if f.cancelled() else interrupt("disconnected"))
    else:
        watcher = asyncio.get_running_loop().create_task(_disconnected(receive))
        watcher.add_done_callback(watched)
    stop = stopping.future()
    stop.add_done_callback(lambda f: None if f.cancelled() else interrupt("stopping"))
    try:
        await work()
    except asyncio.CancelledError:
        if why and task.uncancel() == 0:  # ours alone: the client left or the gateway stops
            return why[0]
        raise
    finally:
        if not why:
            why.append("done")  # a watcher firing from now on changes nothing
        watcher.cancel()
        stop.cancel()
    if why[0] != "done":  # interrupted after work() had already returned: take the cancel back
        task.uncancel()
    return "done"


SHUTTING_DOWN = "the gateway is shutting down; retry the request"


class EventStream(StreamingResponse):
    """An SSE response that notices a client disconnect at once and always closes its body.

    The body's ``finally`` closes the core stream, so closing the body aborts the engine
    request however the response ends (Starlette's own leaves a body suspended mid-``send``
    open until garbage collection). When the gateway stops, the stream ends with an error
    event instead of being cancelled under uvicorn.
    """

    def __init__(self, body: AsyncIterator[bytes], *, stopping: StopSignal, headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            work = functools.partial(self.stream_response, send)
            outcome = await until_disconnect(receive, work, self._stopping, disconnect_future(scope))
            if outcome == "stopping":
                error = error_event(CapacityError(SHUTTING_DOWN))
                await send({"type": "http.response.body", "body": error, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await close_stream(self.body_iterator)


# -- response bodies ------------------------------------------------------------------------


def usage_of(state: OutputDecoder) -> dict[str, Any]:
    return usage(state.prompt_tokens, state.completion_tokens, state.cached_tokens)


async def events(
    stream: AsyncIterator[EngineOutput], state: OutputDecoder, enc: ChunkEncoder
) -> AsyncIterator[bytes]:
    """The SSE body: chunks as text becomes ready, the finish chunk, usage, ``[DONE]``."""
    try:
        role = enc.role()
        if role:
            yield role
        async for out in stream:
            if state.finish_reason is not None:  # output after the finished one: ignore
                break
            text = state.feed(out)
            if text:
                yield enc.delta(text)
            if state.finish_reason is not None and not out.finished:  # stop string, max_tokens
                break
        await close_stream(stream)  # aborts the engine request if we ended it early
        if state.finish_reason is None:
            raise EngineRequestError("the engine stream ended before the request finished")
        yield enc.finish(state.finish_reason)
        if enc.include_usage:
            yield enc.usage(usage_of(state))
        yield DONE
    except Exception as exc:
        yield error_event(exc)
    finally:
        await close_stream(stream)


async def collect(stream: AsyncIterator[EngineOutput], state: OutputDecoder, parts: list[str]) -> None:
    """The whole completion text of a non-streamed request, into ``parts``."""
    try:
        async for out in stream:
            if state.finish_reason is not None:
                break
            parts.append(state.feed(out))
            if state.finish_reason is not None and not out.finished:
                break
    finally:
        await close_stream(stream)
    if state.finish_reason is None:
        raise EngineRequestError("the engine stream ended before the request finished")
