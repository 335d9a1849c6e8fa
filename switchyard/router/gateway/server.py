"""Running the gateway under uvicorn inside an existing event loop, and stopping it gracefully.

uvicorn's signal handlers are disabled: the process entry point (the CLI) owns signals and
decides the shutdown order. :func:`stop_gateway` gives open requests a grace period, then ends
the rest itself (503 or an SSE error event, aborting their engine requests), so uvicorn never
cancels a handler mid-flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

from switchyard.config import GatewayConfig
from switchyard.errors import ConfigError
from switchyard.metrics import unwatch_gc_pauses, watch_gc_pauses
from switchyard.router.gateway.connection import limited_protocol
from switchyard.router.gateway.parsing import BodyParser

logger = logging.getLogger(__name__)

__all__ = ["serve_gateway", "stop_gateway"]


class _Server(uvicorn.Server):  # type: ignore[misc]  # uvicorn is untyped here
    """uvicorn without its signal handlers: the process entry point (the CLI) owns signals."""

    grace_s = 5.0
    stopping: asyncio.Event | None = None
    body_parser: BodyParser | None = None
    froze_gc = False
    gc_thresholds: tuple[int, int, int] | None = None  # Python's, to restore on stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_gateway(
    app: Starlette, config: GatewayConfig, *, graceful_shutdown_s: float = 5.0, freeze_gc_heap: bool = True
) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """Start uvicorn on ``config.host:config.port`` and return once it listens.

    Returns the server, the task running it and the bound port (the real one when
    ``config.port`` is 0). Stop it with :func:`stop_gateway`, which gives open requests
    ``graceful_shutdown_s`` to finish.

    ``freeze_gc_heap`` (on by default) moves every object alive once the gateway listens into
    the garbage collector's permanent generation (``gc.freeze()``, as vLLM's API server does
    after start-up), process-wide. The tokenizer pulls in transformers and torch: about 375,000
    long-lived objects that every full collection would otherwise traverse. Measured in the
    router-overhead benchmark's gateway process, one such collection took 340 ms of CPU, a
    stall for every open stream. Frozen objects are still freed by reference counting; a
    reference cycle among them that later becomes garbage is never collected, a bounded,
    one-time leak at most, since only what existed at start-up is frozen.

    Young collections run every ``config.gc_young_threshold`` allocations instead of Python's
    700 (``GatewayConfig`` says why), and every collection is timed into
    ``switchyard_gc_pause_seconds`` (``/metrics``). Both are process-wide and undone by
    :func:`stop_gateway`.
    """
    # uvicorn's own timeout is only a backstop: stop_gateway ends open requests itself first.
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=limited_protocol(config),  # header/body timeouts and size limits, lingering close
        ws="none",
        proxy_headers=False,  # nothing reads the client address; the middleware cost every request
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(graceful_shutdown_s) + 5,
    )
    server = _Server(uv_config)
    server.grace_s, server.stopping = graceful_shutdown_s, getattr(app.state, "stopping", None)
    server.body_parser = getattr(app.state, "body_parser", None)

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits the process on a bind failure; we must not
            raise ConfigError(f"the gateway could not listen on {config.host}:{config.port}") from exc

    task = asyncio.create_task(run(), name="switchyard-gateway")
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
            raise ConfigError("the gateway stopped during start-up")
        await asyncio.sleep(0.01)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    watch_gc_pauses()
    if config.gc_young_threshold:
        server.gc_thresholds = gc.get_threshold()
        gc.set_threshold(config.gc_young_threshold, *server.gc_thresholds[1:])
    if freeze_gc_heap:
        gc.collect()  # what start-up left as garbage goes now, not into the permanent generation
        gc.freeze()
        server.froze_gc = True
    logger.info("gateway listening on %s:%d", config.host, port)
    return server, task, port


async def stop_gateway(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    """Stop accepting, give open requests the grace period, then end them, and wait for the exit.

    Requests still open after the grace period end with a 503 (non-streamed) or an SSE error
    event (streamed), and their engine requests are aborted.
    """
    server.should_exit = True
    _, pending = await asyncio.wait({task}, timeout=getattr(server, "grace_s", 5.0))
    stopping = getattr(server, "stopping", None)
    if pending and stopping is not None:
        stopping.set()
    await task
    parser = getattr(server, "body_parser", None)
    if parser is not None:  # the request-parsing helper process, if one was started
        await parser.aclose()
    if getattr(server, "froze_gc", False):  # back to normal collection, and a normal interpreter exit
        gc.unfreeze()
    if getattr(server, "gc_thresholds", None) is not None:
        gc.set_threshold(*server.gc_thresholds)
    unwatch_gc_pauses()
