"""The KV-cache server: a ``BlockStore`` behind a small HTTP API, under uvicorn.

Why HTTP with raw bodies rather than gRPC: a block is one opaque byte string of a few MiB, which
an HTTP body carries without framing or a protobuf copy, and Starlette and uvicorn are already
what the gateway runs on; probes and Prometheus need HTTP anyway. The API (keys are lowercase
hex chain hashes, see ``store.py``):

=============================  =============================================================
``PUT /v1/blocks/{key}``       body = the block's bytes. 201 stored, 200 refreshed; 400 bad key
                               or empty body; 413 over ``max_block_bytes`` or the whole store.
``GET /v1/blocks/{key}``       200 with the bytes (``application/octet-stream``); 404 a miss.
``DELETE /v1/blocks/{key}``    204 removed; 404 not held.
``POST /v1/contains``          ``{"keys": [...]}`` -> ``{"present": [bool...], "prefix": n}``,
                               ``n`` the number of leading keys held (the reusable prefix of a
                               hash chain); 400 malformed; 413 over ``max_batch_keys``.
``GET /v1/stats``              counters and occupancy as JSON.
``GET /metrics``               Prometheus text (``metrics.py``).
``GET /health``, ``/ready``    liveness; readiness (503 once shutdown began).
=============================  =============================================================

Errors are JSON ``{"error": {"type", "message", "param"}}`` with the status from
``switchyard.errors.http_status``: the store raises ``InvalidRequestError`` and
``RequestTooLargeError``, and this module translates them once, in ``_handled``.

Concurrency: one event loop; store calls are short and synchronous, so no lock and no thread.
Bodies are read incrementally and refused as soon as they pass the limit, so an oversized
upload never sits in memory. Shutdown (``stop``): readiness turns 503, the listener closes,
open requests get ``shutdown_grace_s``, and the final counters are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from switchyard.errors import (
    ConfigError,
    InvalidRequestError,
    RequestTooLargeError,
    SwitchyardError,
    http_status,
)
from switchyard.kvcache.config import KVCacheServerConfig
from switchyard.kvcache.metrics import KVCacheCollector, RequestCounts, render
from switchyard.kvcache.store import BlockStore

logger = logging.getLogger(__name__)

__all__ = ["KVCacheServer"]

_CONTAINS_BODY_BYTES_PER_KEY = 160  # a 128-digit key, its quotes and comma, with JSON slack
Handler = Callable[[Request], Awaitable[Response]]


class _ContainsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[str]


class _Uvicorn(uvicorn.Server):  # type: ignore[misc]  # uvicorn is untyped here
    """uvicorn without its signal handlers: the process entry point owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _error(exc: SwitchyardError) -> JSONResponse:
    body = {"error": {"type": exc.error_type, "message": exc.message, "param": exc.param}}
    return JSONResponse(body, status_code=http_status(exc))


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError(f"invalid Content-Length {declared!r}", param="Content-Length")
        if int(declared) > limit:
            raise RequestTooLargeError(f"{what} of {declared} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"{what} is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class KVCacheServer:
    """One cache server: the store, its HTTP app, its metrics registry, and the uvicorn server."""

    def __init__(self, config: KVCacheServerConfig) -> None:
        self.config = config
        self.store = BlockStore(config.memory, eviction=config.eviction)
        self.requests: RequestCounts = Counter()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(KVCacheCollector(self.store, self.requests))
        self.stopping = False
        self.app = Starlette(
            routes=[
                Route("/v1/blocks/{key}", self._handled("put", self._put), methods=["PUT"]),
                Route("/v1/blocks/{key}", self._handled("get", self._get), methods=["GET"]),
                Route("/v1/blocks/{key}", self._handled("delete", self._delete), methods=["DELETE"]),
                Route("/v1/contains", self._handled("contains", self._contains), methods=["POST"]),
                Route("/v1/stats", self._handled("stats", self._stats), methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/ready", self._ready, methods=["GET"]),
            ]
        )
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    # -- handlers ------------------------------------------------------------------------------

    def _handled(self, op: str, handler: Handler) -> Handler:
        """``handler`` with our errors translated to JSON responses and every outcome counted."""

        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except SwitchyardError as exc:
                logger.debug("kvcache %s rejected: %s", op, exc.message)
                response = _error(exc)
            except ClientDisconnect:
                response = Response(status_code=499)  # never sent: the client is gone
            self.requests[op, response.status_code] += 1
            return response

        return endpoint

    async def _put(self, request: Request) -> Response:
        key = request.path_params["key"]
        payload = await _read_body(request, self.config.max_block_bytes, "block")
        result = self.store.put(key, payload)
        if result.evicted:
            logger.debug("kvcache evicted=%d for key=%s", len(result.evicted), key)
        return Response(status_code=201 if result.created else 200)

    async def _get(self, request: Request) -> Response:
        payload = self.store.get(request.path_params["key"])
        if payload is None:
            return JSONResponse(
                {"error": {"type": "not_found_error", "message": "block not held", "param": "key"}},
                status_code=404,
            )
        return Response(payload, media_type="application/octet-stream")

    async def _delete(self, request: Request) -> Response:
        if not self.store.delete(request.path_params["key"]):
            return JSONResponse(
                {"error": {"type": "not_found_error", "message": "block not held", "param": "key"}},
                status_code=404,
            )
        return Response(status_code=204)

    async def _contains(self, request: Request) -> Response:
        limit = self.config.max_batch_keys
        raw = await _read_body(request, limit * _CONTAINS_BODY_BYTES_PER_KEY + 64, "contains request")
        try:
            body = _ContainsRequest.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidRequestError(
                f'expected {{"keys": [hex, ...]}}: {where}: {first["msg"]}', param=where
            ) from exc
        if len(body.keys) > limit:
            raise RequestTooLargeError(f"{len(body.keys)} keys asked, at most {limit} per request")
        present = self.store.contains(body.keys)
        prefix = next((i for i, held in enumerate(present) if not held), len(present))
        return JSONResponse({"present": present, "prefix": prefix})

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(asdict(self.store.stats()))

    async def _metrics(self, request: Request) -> Response:
        body, content_type = render(self.registry)
        return Response(body, headers={"Content-Type": content_type})

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready(self, request: Request) -> Response:
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ready"})

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen on ``config.host:config.port``; returns the bound port (the real one for 0)."""
        cfg = self.config
        server = _Uvicorn(
            uvicorn.Config(
                self.app,
                host=cfg.host,
                port=cfg.port,
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=max(1, round(cfg.shutdown_grace_s)),
            )
        )

        async def run() -> None:
            try:
                await server.serve()
            except SystemExit as exc:  # uvicorn exits the process on a bind failure; we must not
                raise ConfigError(f"the KV-cache server could not listen on {cfg.host}:{cfg.port}") from exc

        self._server, self._task = server, asyncio.create_task(run(), name="switchyard-kvcache")
        while not server.started:
            if self._task.done():
                self._task.result()  # raises the start-up error
                raise ConfigError("the KV-cache server stopped during start-up")
            await asyncio.sleep(0.01)
        port = int(server.servers[0].sockets[0].getsockname()[1])
        logger.info(
            "kvcache server listening host=%s port=%d capacity_bytes=%d eviction=%s max_block_bytes=%d",
            cfg.host,
            port,
            cfg.memory,
            cfg.eviction,
            cfg.max_block_bytes,
        )
        return port

    async def run_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT), then ``stop()``."""
        await self.start()
        assert self._task is not None
        waiter = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await self.stop()

    async def stop(self) -> None:
        """Turn unready, stop listening, let open requests finish within the grace, log totals."""
        self.stopping = True
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None
        stats: dict[str, Any] = asdict(self.store.stats())
        logger.info("kvcache server stopped %s", " ".join(f"{k}={v}" for k, v in stats.items()))
