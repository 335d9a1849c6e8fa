"""A minimal HTTP/1.1 keep-alive client for load generation: one connection per stream.

Why not httpx: its connection pool checks every idle pooled connection with a readability
poll (a syscall) each time it assigns or releases one (httpcore 1.0.9,
``AsyncConnectionPool._assign_requests_to_connections`` → ``has_expired`` →
``is_readable``), so with N pooled connections each request costs O(N) syscalls, and a
burst of N requests O(N²). With 1,000 connections that client-side cost dominated the first
run of this benchmark (a single request took 13 ms through httpx against ~2 ms through this
client; the gateway's own handler time was the same ~2.6 ms in both). This client writes a
request as one buffer and reads the response with ``asyncio.StreamReader``: a few
microseconds per request, so what is measured is the server.

Only what the benchmark needs: ``Content-Length`` and ``chunked`` response bodies, no
redirects, no TLS, no proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

__all__ = ["HttpConnection", "post_request"]


def post_request(path: str, body: dict[str, Any], host: str = "127.0.0.1") -> bytes:
    """The bytes of a ``POST`` with a JSON body, built once and reused for every send."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class HttpConnection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def _head(self) -> tuple[int, dict[bytes, bytes]]:
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # no trailers are sent
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size + 2))
            parts[-1] = parts[-1][:-2]

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request (:func:`post_request`) and read the whole response."""
        self._writer.write(raw)
        status, headers = await self._head()
        if headers.get(b"transfer-encoding") == b"chunked":
            return status, await self._chunked()
        return status, await self._reader.readexactly(int(headers.get(b"content-length", b"0")))

    async def start_stream(self, raw: bytes) -> int:
        """Send a streamed request and return once the response headers have arrived."""
        self._writer.write(raw)
        status, _ = await self._head()
        return status

    async def first_event(self) -> bytes:
        """The first SSE chunk of a started stream (a held stream's first token)."""
        return await self._reader.readuntil(b"\n\n")

    async def drain_until_closed(self) -> None:
        """Read and discard the rest of a stream until the peer or :meth:`close` ends it."""
        try:
            while await self._reader.read(1 << 16):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):  # reset by the peer: closed all the same
            await self._writer.wait_closed()
