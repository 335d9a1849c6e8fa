"""The server side of the router-overhead benchmark, each part in its own process.

Why separate processes: with the load generator, the gateway and the workers on one event
loop (the first version of ``bench/router_overhead.py``), the client's cost and every
queue on that loop were counted as gateway latency. Here the workers run in one child
process, the gateway with its router core in another, and the load generator in the parent,
as they would be deployed. All traffic is loopback.

Each child answers on a pipe once it listens (its ports) and then serves until the parent
sends ``"stop"`` or goes away. Children are started with the ``spawn`` method: forking a
process that has already imported gRPC is unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from switchyard import event_loop
from switchyard.errors import MigrationError
from switchyard.event_loop import EventLoopName
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    KvSnapshot,
    LoadReport,
    SuspendedRequest,
)

#: Requests asking for at least this many tokens are *held* streams: one token per tick.
HOLD_MIN_TOKENS = 512
#: The token every output carries: " the" in the tiny model's vocabulary, so each one decodes
#: to text at once (a byte-level token alone would be held back as incomplete UTF-8).
TOKEN = 449


class InstantEngine:
    """An ``Engine`` that finishes a request at once, unless it is a held stream.

    A request with ``max_tokens < HOLD_MIN_TOKENS`` gets one output with all its tokens and
    ``finished=True`` straight away. A longer one is a held stream: one token every
    ``hold_tick_s`` until ``max_tokens`` (or until the client goes away), which is how the
    benchmark keeps many streams open with a steady trickle of tokens to forward.
    """

    def __init__(self, instance_id: str, *, hold_tick_s: float = 1.0) -> None:
        self.instance_id = instance_id
        self.hold_tick_s = hold_tick_s
        self._rng = random.Random(instance_id)

    @property
    def block_size(self) -> int:
        return 32

    @property
    def max_model_len(self) -> int:
        return 2048

    @property
    def kv_bytes_per_block(self) -> int:
        return 0

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        n = req.sampling.max_tokens
        prompt_len = len(req.prompt_token_ids)
        if n < HOLD_MIN_TOKENS:
            tokens = [TOKEN] * n
            yield EngineOutput(req.request_id, tokens, True, FinishReason.LENGTH, prompt_len, 0)
            return
        # The first gap is a random fraction of a tick, so streams opened together do not tick
        # together: the aggregate is a steady streams/tick tokens per second.
        gap = self._rng.uniform(0, self.hold_tick_s)
        for i in range(n):
            last = i == n - 1
            reason = FinishReason.LENGTH if last else None
            yield EngineOutput(req.request_id, [TOKEN], last, reason, prompt_len, 0)
            if not last:
                await asyncio.sleep(gap)
                gap = self.hold_tick_s

    async def abort(self, request_id: str) -> bool:
        return False

    def load(self) -> LoadReport:
        return LoadReport(self.instance_id, time.monotonic(), kv_blocks_total=100)

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        raise MigrationError("instant engine cannot migrate")

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        raise MigrationError("instant engine cannot migrate")

    async def suspend(self, request_id: str) -> SuspendedRequest:
        raise MigrationError("instant engine cannot migrate")

    async def admit_migrated(self, req: SuspendedRequest) -> AsyncIterator[EngineOutput]:
        raise MigrationError("instant engine cannot migrate")
        yield  # pragma: no cover  # makes this an async generator

    async def release_suspended(self, request_id: str) -> bool:
        return False

    async def check_health(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def _serve_until_stopped(conn: Connection, reply: Any) -> None:
    """Send ``reply`` to the parent, then wait (off the loop) for ``"stop"`` or a closed pipe."""
    conn.send(reply)

    def wait_stop() -> None:
        try:
            while conn.recv() != "stop":
                pass
        except EOFError:
            pass

    await asyncio.to_thread(wait_stop)


async def _workers_main(conn: Connection, model: str, n_workers: int, hold_tick_s: float) -> None:
    from switchyard.messages import InstanceInfo
    from switchyard.workers.worker_server import start_worker_server

    servers, addresses = [], []
    for i in range(n_workers):
        engine = InstantEngine(f"w{i}", hold_tick_s=hold_tick_s)

        def info(port: int, iid: str = engine.instance_id) -> InstanceInfo:
            return InstanceInfo(iid, f"127.0.0.1:{port}", model, engine="sim")

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.05)
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    try:
        await _serve_until_stopped(conn, addresses)
    finally:
        for server in servers:
            await server.stop(None)


async def _gateway_main(
    conn: Connection, model: str, worker_addresses: list[str], policy: str, gc_young_threshold: int | None
) -> None:
    from switchyard.config import GatewayConfig, RouterConfig
    from switchyard.messages import InstanceInfo, Membership
    from switchyard.router.core import RouterCore
    from switchyard.router.gateway import build_gateway_app, serve_gateway, stop_gateway
    from switchyard.router.gateway.tokenizer import TokenizerAdapter
    from switchyard.testing.tiny_model import build_tiny_model

    infos = tuple(InstanceInfo(f"w{i}", addr, model, engine="sim") for i, addr in enumerate(worker_addresses))
    core = RouterCore(RouterConfig(policy=policy))
    core.apply_membership(Membership(1, infos))
    await core.start()
    while not core.ready:  # noqa: ASYNC110  # the core exposes no readiness event
        await asyncio.sleep(0.01)
    tokenizer = TokenizerAdapter.from_model_dir(build_tiny_model())
    config = GatewayConfig(port=0)
    if gc_young_threshold is not None:
        config = config.model_copy(update={"gc_young_threshold": gc_young_threshold})
    app = build_gateway_app(core, tokenizers={model: tokenizer}, config=config)
    server, task, port = await serve_gateway(app, config)
    try:
        await _serve_until_stopped(conn, port)
    finally:
        await stop_gateway(server, task)
        await core.close()


def workers_child(conn: Connection, model: str, n_workers: int, hold_tick_s: float) -> None:
    """Process entry: ``n_workers`` Worker gRPC servers over :class:`InstantEngine`s.

    On the standard loop, the same for every path measured (the engine side is not under test).
    """
    asyncio.run(_workers_main(conn, model, n_workers, hold_tick_s))


def gateway_child(
    conn: Connection,
    model: str,
    worker_addresses: list[str],
    policy: str,
    loop: EventLoopName,
    gc_young_threshold: int | None = None,
) -> None:
    """Process entry: a ``RouterCore`` over the workers and the HTTP gateway in front of it,
    on ``loop``, as ``switchyard serve --event-loop`` runs it. ``gc_young_threshold`` overrides
    ``GatewayConfig``'s (``bench/overhead_gc_ab.py`` compares two)."""
    event_loop.run(_gateway_main(conn, model, worker_addresses, policy, gc_young_threshold), loop=loop)


class Child:
    """A started child process and its pipe; :meth:`stop` ends it."""

    def __init__(self, target: Callable[..., None], *args: Any, timeout_s: float = 120.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()
        try:
            if not self._conn.poll(timeout_s):
                raise RuntimeError(f"{target.__name__} did not start within {timeout_s:.0f} s")
            self.reply: Any = self._conn.recv()
        except EOFError:
            self.stop()
            code = self.process.exitcode
            raise RuntimeError(f"{target.__name__} exited during start-up (exit code {code})") from None
        except RuntimeError:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        with contextlib.suppress(OSError):  # the child is already gone
            self._conn.send("stop")
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (gRPC's poller thread included)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)
