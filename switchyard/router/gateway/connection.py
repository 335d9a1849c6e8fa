"""The gateway's HTTP/1.1 connection: uvicorn's httptools protocol, with limits on slow or huge input.

uvicorn bounds none of these, and each lets one client hold a connection, or memory, forever:

* **Slow headers** (slowloris): uvicorn arms no timer while a request's headers arrive, nor on
  a new connection that sends nothing. Here a request's headers must be complete within
  ``GatewayConfig.header_timeout_s`` of its first byte (of the connection opening, for the
  first request); past it the client gets a 408, or, if it had sent nothing, just a close.
* **Slow bodies**: nothing bounds the wait for the rest of a body either. Here the whole body
  must arrive within ``body_timeout_s`` of the end of the headers; past it a 408 (unless the
  response has begun), and the handler waiting for the body sees a disconnect.
* **Huge headers**: httptools has no header size limit and grows a header value by
  concatenation, so a client can make the process copy and hold any amount. Here headers over
  ``max_header_bytes`` (request line, names and values) get a 431 once the limit is crossed,
  with at most one socket read (256 KiB) past it buffered.
* **Answering before the body is read** (413, 408, 401, a 404 for a POST): closing at once
  with unread input makes the kernel send a reset, and a client still sending its body may see
  "connection reset" instead of the response; keeping the connection open instead makes
  uvicorn read and discard the rest of the body, however long. Here the connection *lingers*:
  the response is flushed, the write side shut down, and input discarded until the client
  closes or :data:`LINGER_S` passes, the way nginx's lingering close does.

The protocol also offers the scope extension ``streaming.DISCONNECT_EXTENSION`` (a future
resolved when the client is gone), so a handler watches for a disconnect without a task of
its own (``streaming.until_disconnect``).

Errors raised here are answered with the gateway's one error body, ``streaming.error_payload``.
Timers cost a request nothing in the common case: the header timer is armed per connection
and only re-armed for a request whose headers span reads, and the body timer only for a body
that does not arrive with its headers.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from switchyard.config import GatewayConfig
from switchyard.errors import HeadersTooLargeError, RequestTimeoutError, SwitchyardError
from switchyard.router.gateway.streaming import DISCONNECT_EXTENSION, error_payload

__all__ = ["LINGER_S", "limited_protocol"]

#: How long a connection that is being closed with unread input keeps discarding it, so the
#: client reads the response before it sees the close.
LINGER_S = 2.0


class _TooLarge(Exception):
    """Raised from a parser callback to stop parsing headers over the limit."""


def _error_bytes(exc: SwitchyardError) -> bytes:
    status, body = error_payload(exc)
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    )
    return head % (status, HTTPStatus(status).phrase.encode(), len(payload)) + payload


class _CycleTransport:
    """The transport a request cycle writes through: the real one, except that the cycle's
    ``close()`` (a ``Connection: close`` response) becomes a lingering close when the request's
    body has not all arrived."""

    __slots__ = ("_protocol", "is_closing", "write")

    def __init__(self, protocol: _LimitedProtocol, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self.write = transport.write  # per token: no indirection
        self.is_closing = transport.is_closing

    def close(self) -> None:
        self._protocol.close_after_response()


class _LimitedProtocol(HttpToolsProtocol):  # type: ignore[misc]  # uvicorn is untyped here
    header_timeout_s = 10.0
    body_timeout_s = 60.0
    max_header_bytes = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True  # reading a request's headers, or waiting for the next request
        self._began = False  # a request's first byte has arrived and its headers have not ended
        self._header_bytes = 0  # read while in headers, counted per whole read
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None  # ends lingering
        self._lingering = False
        self._cycle_transport: _CycleTransport | None = None
        self._lost = False  # the client is gone (or the connection is being closed)
        self._disconnect_waiters: set[asyncio.Future[None]] = set()
        self._extensions = {DISCONNECT_EXTENSION: self._disconnect_future}

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._cycle_transport = _CycleTransport(self, transport)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._client_gone()
        super().connection_lost(exc)

    def _disconnect_future(self) -> asyncio.Future[None]:
        """The scope extension ``DISCONNECT_EXTENSION``: a future resolved when the client is
        gone, so a handler watches for it without a task reading ``receive()``. Cancel it when
        no longer interested."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if self._lost:
            fut.set_result(None)
        else:
            self._disconnect_waiters.add(fut)
            fut.add_done_callback(self._disconnect_waiters.discard)
        return fut

    def _client_gone(self) -> None:
        self._lost = True
        for fut in self._disconnect_waiters:
            if not fut.done():
                fut.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # discarded: the response is out, the connection is closing
        self._unset_keepalive_if_required()
        if self._in_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _TooLarge):
                self._reject(self._headers_too_large())
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # the gateway serves no WebSocket
            return
        if not self._began:
            if self._in_headers or self.cycle is None or not self.cycle.more_body:
                return  # the common case: whole requests per read
            if self._body_timer is None:  # the body spans reads: time it from here
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timeout)
        elif self._header_bytes > self.max_header_bytes:
            self._reject(self._headers_too_large())
        elif self._header_timer is None:  # the headers span reads: time them from here
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = self._began = True
        self.scope["extensions"] = self._extensions

    def on_headers_complete(self) -> None:
        if not 0 < self._header_bytes <= self.max_header_bytes:  # else they fit in what was read
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self.max_header_bytes:
                raise _TooLarge  # ends parsing; data_received answers 431
        self._in_headers = self._began = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        self.cycle.transport = self._cycle_transport

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers, self._header_bytes = True, 0  # the next request's headers come next
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and cycle.more_body and not self._lingering:
            self._linger()  # answered before its body arrived: do not read the rest forever

    # -- limits ----------------------------------------------------------------------------

    def _headers_too_large(self) -> HeadersTooLargeError:
        return HeadersTooLargeError(f"request headers exceed the limit of {self.max_header_bytes} bytes")

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._lingering or self.transport.is_closing():
            return
        if self._began:
            msg = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self._reject(RequestTimeoutError(msg))
        elif self.cycle is None:  # a new connection that sent nothing: nothing to answer
            self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.cycle is not None and self.cycle.more_body and not self._lingering:
            msg = f"the request body did not arrive within {self.body_timeout_s:g} s"
            self._reject(RequestTimeoutError(msg))

    def _reject(self, exc: SwitchyardError) -> None:
        """Answer ``exc`` without the application and close the connection, lingering. A
        request whose body is still awaited by its handler sees a disconnect."""
        self.logger.info("rejected a request: %s", exc.message)
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_error_bytes(exc))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            self._client_gone()
        self._linger()

    def close_after_response(self) -> None:
        """A response with ``Connection: close`` is complete: close, lingering if input is unread."""
        if self._lingering:
            return
        if self.cycle is not None and self.cycle.more_body:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """Flush, shut down our side, and discard input until the client closes or ``LINGER_S``."""
        self._lingering = True
        self._cancel_timers()
        self._unset_keepalive_if_required()
        self.flow.resume_reading()  # read (and drop) whatever the client still sends
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._close_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._close_timer = None


def limited_protocol(config: GatewayConfig) -> type[asyncio.Protocol]:
    """The connection protocol class for uvicorn's ``http=``, with ``config``'s limits."""
    attrs = {
        "header_timeout_s": config.header_timeout_s,
        "body_timeout_s": config.body_timeout_s,
        "max_header_bytes": config.max_header_bytes,
    }
    return type("LimitedHttpProtocol", (_LimitedProtocol,), attrs)
