"""Interleaved A/B of the router's link to a worker: a ``Generate`` call per request against the
multiplexed ``Dispatch`` stream (what ``WorkerClient.generate`` uses now).

Why: the router-overhead benchmark found ~650 µs of client CPU for a new gRPC call against
~240 µs for a message on an open stream, and the gateway pays it per request. This measures the
client's side of both paths directly, in one process against one worker process (the
``InstantEngine`` of ``bench/overhead_servers.py``, which answers at once), blocks of each path
alternating so that a slow minute of a shared box hits both:

* ``sequential``: one request at a time: client CPU per request (this process, all threads:
  gRPC's poller included) and latency P50/P99;
* ``concurrent``: ``--concurrency`` requests in flight at once: client CPU per request;
* ``streaming``: ``--streams`` requests of 512 tokens at once, one token every 2 ms each at
  random phases: client CPU per streamed token. The worst case for one shared call: tokens of
  different requests rarely coincide, so each costs a message of its own, and on one call
  every message costs a wake-up of its own;
* ``stepped``: the same, but every request's token comes in the same engine step, as a
  batching engine emits them (a second worker, ``SteppedEngine``): the worker packs a step's
  chunks into one message.

The baseline reproduces the code ``WorkerClient.generate`` had before Dispatch (one
``Generate`` call, translated the same way, cancelled at the end).

    python -m bench.dispatch_ab --rounds 6 --requests 1000 --out bench/results/dispatch-ab
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.overhead_decisions import pct
from bench.overhead_servers import (
    HOLD_MIN_TOKENS,
    TOKEN,
    Child,
    InstantEngine,
    _serve_until_stopped,
    cpu_seconds,
    workers_child,
)
from bench.provenance import run_header
from switchyard import event_loop
from switchyard.api import wire
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, InstanceInfo, SamplingOptions
from switchyard.router.worker_client import WorkerClient

MODEL = "instant"
PROMPT = list(range(100, 140))
TICK_S = 0.002  # a streaming request's seconds per token
_ids = iter(range(10**9))


async def per_call(client: WorkerClient, req: EngineRequest) -> None:
    """The pre-Dispatch ``WorkerClient.generate``: one Generate call for the request."""
    call = client._stub.Generate(wire.engine_request_to_pb(req))
    try:
        with client._translate("Generate"):
            async for chunk in call:
                if wire.output_from_pb(chunk).finished:
                    break
    finally:
        call.cancel()


async def dispatched(client: WorkerClient, req: EngineRequest) -> None:
    async for out in client.generate(req):
        if out.finished:
            break


PATHS: dict[str, Callable[[WorkerClient, EngineRequest], Awaitable[None]]] = {
    "generate_call": per_call,
    "dispatch_stream": dispatched,
}


def _request() -> EngineRequest:
    i = next(_ids)
    return EngineRequest(f"ab{i}", PROMPT, SamplingOptions(max_tokens=1 + i % 4))


async def _block(
    fn: Callable[[WorkerClient, EngineRequest], Awaitable[None]],
    client: WorkerClient,
    n: int,
    concurrency: int,
    worker_pid: int,
) -> dict[str, Any]:
    lat: list[float] = []
    me, worker0 = cpu_seconds(os.getpid()), cpu_seconds(worker_pid)
    t0 = time.perf_counter()
    if concurrency == 1:
        for _ in range(n):
            s = time.perf_counter()
            await fn(client, _request())
            lat.append((time.perf_counter() - s) * 1000)
    else:
        for start in range(0, n, concurrency):
            await asyncio.gather(*(fn(client, _request()) for _ in range(min(concurrency, n - start))))
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "client_cpu_us_per_request": (cpu_seconds(os.getpid()) - me) / n * 1e6,
        "worker_cpu_us_per_request": (cpu_seconds(worker_pid) - worker0) / n * 1e6,
        "requests_per_s": n / wall,
    }
    if lat:
        out["p50_ms"], out["p99_ms"] = pct(lat, 0.5), pct(lat, 0.99)
    return out


class SteppedEngine(InstantEngine):
    """Held streams advance together, one token each per step, as a batching engine's step
    emits them; short requests answer at once as in ``InstantEngine``."""

    def __init__(self, instance_id: str, *, hold_tick_s: float) -> None:
        super().__init__(instance_id, hold_tick_s=hold_tick_s)
        self._tick: asyncio.Future[None] | None = None
        self._clock: asyncio.Task[None] | None = None

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.hold_tick_s)
            tick, self._tick = self._tick, loop.create_future()
            if tick is not None:
                tick.set_result(None)

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        n = req.sampling.max_tokens
        if n < HOLD_MIN_TOKENS:
            async for out in super().generate(req):
                yield out
            return
        if self._clock is None:
            self._tick = asyncio.get_running_loop().create_future()
            self._clock = asyncio.create_task(self._run_clock())
        for i in range(n):
            assert self._tick is not None
            await asyncio.shield(self._tick)
            last = i == n - 1
            yield EngineOutput(
                req.request_id,
                [TOKEN],
                last,
                FinishReason.LENGTH if last else None,
                len(req.prompt_token_ids),
                0,
            )


async def _stepped_main(conn: Connection, tick_s: float) -> None:
    from switchyard.workers.worker_server import start_worker_server

    engine = SteppedEngine("s0", hold_tick_s=tick_s)
    server, port = await start_worker_server(
        engine, InstanceInfo("s0", "", MODEL, engine="sim"), host="127.0.0.1", load_interval_s=0.05
    )
    try:
        await _serve_until_stopped(conn, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def stepped_worker_child(conn: Connection, tick_s: float) -> None:
    """Process entry: one Worker server over a :class:`SteppedEngine`."""
    asyncio.run(_stepped_main(conn, tick_s))


async def _streaming(
    fn: Callable[[WorkerClient, EngineRequest], Awaitable[None]],
    client: WorkerClient,
    streams: int,
    worker_pid: int,
) -> dict[str, Any]:
    """``streams`` requests of HOLD_MIN_TOKENS tokens at once; CPU per streamed token."""
    me, worker0 = cpu_seconds(os.getpid()), cpu_seconds(worker_pid)
    sampling = SamplingOptions(max_tokens=HOLD_MIN_TOKENS)
    await asyncio.gather(
        *(fn(client, EngineRequest(f"st{next(_ids)}", PROMPT, sampling)) for _ in range(streams))
    )
    tokens = streams * HOLD_MIN_TOKENS
    return {
        "client_cpu_us_per_token": (cpu_seconds(os.getpid()) - me) / tokens * 1e6,
        "worker_cpu_us_per_token": (cpu_seconds(worker_pid) - worker0) / tokens * 1e6,
    }


async def _ab(rounds: int, n: int, concurrency: int, streams: int) -> dict[str, Any]:
    worker = await asyncio.to_thread(Child, workers_child, MODEL, 1, TICK_S)
    stepped = await asyncio.to_thread(Child, stepped_worker_child, TICK_S)
    client = WorkerClient(worker.reply[0], instance_id="w0")
    stepped_client = WorkerClient(stepped.reply, instance_id="s0")
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {
        scenario: {p: [] for p in PATHS} for scenario in ("sequential", "concurrent", "streaming", "stepped")
    }
    try:
        for fn in PATHS.values():  # warm both paths up: channel, stream, code
            await _block(fn, client, 200, 1, worker.pid)
        for rnd in range(rounds):
            order = list(PATHS) if rnd % 2 == 0 else list(reversed(PATHS))
            for scenario, conc in (("sequential", 1), ("concurrent", concurrency)):
                for path in order:
                    rows[scenario][path].append(await _block(PATHS[path], client, n, conc, worker.pid))
            for path in order:
                rows["streaming"][path].append(await _streaming(PATHS[path], client, streams, worker.pid))
            for path in order:
                rows["stepped"][path].append(
                    await _streaming(PATHS[path], stepped_client, streams, stepped.pid)
                )
            seq = rows["sequential"]
            print(
                f"round {rnd + 1}: client CPU/request sequential "
                + ", ".join(f"{p} {seq[p][-1]['client_cpu_us_per_request']:.0f} us" for p in PATHS),
                flush=True,
            )
    finally:
        await client.close()
        await stepped_client.close()
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(stepped.stop)
    summary = {
        scenario: {
            path: {
                key: statistics.median(r[key] for r in blocks)
                for key in blocks[0]
                if isinstance(blocks[0][key], float)
            }
            for path, blocks in by_path.items()
        }
        for scenario, by_path in rows.items()
    }
    return {"rounds": rows, "median": summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000, help="requests per block")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--streams", type=int, default=8, help="concurrent 512-token requests (streaming)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/dispatch-ab"))
    args = parser.parse_args(argv)
    started, load_before = dt.datetime.now(dt.UTC), os.getloadavg()
    ab = event_loop.run(_ab(args.rounds, args.requests, args.concurrency, args.streams), loop="uvloop")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**run_header("bench.dispatch_ab", argv, started, load_before), **ab}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    for scenario, by_path in ab["median"].items():
        print(
            f"{scenario}: "
            + "; ".join(
                f"{p} "
                + ", ".join(f"{k} {v:.2f}" if k.endswith("_ms") else f"{k} {v:.0f}" for k, v in m.items())
                for p, m in by_path.items()
            )
        )
    print(f"wrote {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
