"""End-to-end latency the router core and the HTTP gateway add (part 2 of the router-overhead benchmark).

Three processes on loopback (``bench/overhead_servers.py``): 2 Worker gRPC servers over an
engine that answers at once; the gateway with its own ``RouterCore``; and this one, the load
generator. Every request goes one of three paths, and the added latency of a path is its
latency minus the direct path's, measured in the same round:

* ``direct_worker_grpc``: ``WorkerClient.generate`` to a worker, alternating between the two
  (the baseline: what calling the engine directly costs);
* ``router_core_inprocess``: ``RouterCore.generate`` in this process (the router as a library:
  decision, registry bookkeeping, stream forwarding);
* ``gateway_http``: ``POST /v1/completions`` to the gateway process (HTTP parsing, validation,
  tokenization, routing, detokenization, the JSON response), with :mod:`bench.http_load`.

Scenarios, each run for every path in turn, ``rounds`` times, paths interleaved so that the
box's background load falls on all of them alike; per path the median over rounds is reported:

* ``sequential``: one request at a time. The unloaded cost.
* ``held``: N streams are first opened through the path and kept open (each engine stream
  emits one token per ``hold_tick_s``, which the client reads), then probe requests go
  through the same path one at a time. This is the added latency *at N concurrent streams*:
  what a request pays while the router or gateway carries N open streams.
* ``burst``: N requests started at the same instant, the whole batch in flight at once.
  Latency here is queueing: by Little's law the batch's P99 is about N divided by the path's
  throughput, so it measures throughput on this box, not per-request overhead.

The CPU seconds of each process per request (``sequential`` and ``burst``) are recorded too:
they do not depend on how busy the box is, and for the gateway process they are the gateway's
and router's whole cost, gRPC client included.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from bench.http_load import HttpConnection, post_request
from bench.overhead_decisions import pct
from bench.overhead_servers import HOLD_MIN_TOKENS, Child, cpu_seconds, gateway_child, workers_child
from switchyard.config import RouterConfig
from switchyard.event_loop import EventLoopName
from switchyard.messages import EngineRequest, InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.router.worker_client import WorkerClient
from switchyard.testing.tiny_model import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME
PROMPT = "The quick brown fox jumps over the lazy dog."
PATHS = ("direct_worker_grpc", "router_core_inprocess", "gateway_http")
ADDED_P99_TARGET_MS = 2.0
REQUEST_TIMEOUT_S = 120.0
HOLD_CPU_WINDOW_S = 2.0
_ids = itertools.count()


def max_tokens(i: int) -> int:
    return 1 + i % 4


class Held:
    """A stream held open through some path: its reader task, and what else to close."""

    def __init__(self, task: asyncio.Task[None], conn: HttpConnection | None = None) -> None:
        self.task, self.conn = task, conn

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Paths:
    """The three ways to send a request, over connections set up once."""

    def __init__(self, worker_addresses: list[str], gateway_port: int, prompt_ids: list[int], policy: str):
        self.clients = [WorkerClient(a, instance_id=f"w{i}") for i, a in enumerate(worker_addresses)]
        infos = tuple(InstanceInfo(f"w{i}", a, MODEL, engine="sim") for i, a in enumerate(worker_addresses))
        self.core = RouterCore(RouterConfig(policy=policy))
        self.core.apply_membership(Membership(1, infos))
        self.port = gateway_port
        self.prompt_ids = prompt_ids
        self.conns: list[HttpConnection] = []
        self._raw = [post_request("/v1/completions", self._body(max_tokens(i))) for i in range(4)]
        self._raw_hold = post_request("/v1/completions", self._body(HOLD_MIN_TOKENS * 2, stream=True))

    def _body(self, n: int, *, stream: bool = False) -> dict[str, Any]:
        return {"model": MODEL, "prompt": PROMPT, "max_tokens": n, "temperature": 0.0, "stream": stream}

    async def start(self) -> None:
        await self.core.start()
        while not self.core.ready:  # noqa: ASYNC110  # the core exposes no readiness event
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.reset_connections(0)
        await self.core.close()
        for c in self.clients:
            await c.close()

    async def reset_connections(self, n: int) -> None:
        """Fresh gateway connections (outside any timing), ``n`` of them, opened in batches."""
        for conn in self.conns:
            await conn.close()
        self.conns = []
        for start in range(0, n, 100):
            batch = range(start, min(n, start + 100))
            self.conns += await asyncio.gather(*(HttpConnection.open("127.0.0.1", self.port) for _ in batch))

    def request_fn(self, path: str) -> Callable[[int], Awaitable[None]]:
        return {
            "direct_worker_grpc": self.direct,
            "router_core_inprocess": self.router_core,
            "gateway_http": self.gateway,
        }[path]

    async def direct(self, i: int) -> None:
        req = EngineRequest(f"d{next(_ids)}", self.prompt_ids, SamplingOptions(max_tokens(i)))
        async for out in self.clients[i % 2].generate(req):
            if out.finished:
                break

    async def router_core(self, i: int) -> None:
        req = RoutingRequest(f"r{next(_ids)}", MODEL, self.prompt_ids, SamplingOptions(max_tokens(i)))
        async for out in self.core.generate(req):
            if out.finished:
                break

    async def gateway_gc(self) -> dict[str, float]:
        """The gateway process's ``switchyard_gc_pause_seconds`` series, read from its /metrics."""
        status, body = await self.conns[0].request(_METRICS_GET)
        if status != 200:
            raise RuntimeError(f"HTTP {status} from /metrics")
        return {f"{name}{labels}": float(value) for name, labels, value in _GC_SERIES.findall(body.decode())}

    async def gateway(self, i: int) -> None:
        status, body = await self.conns[i % len(self.conns)].request(self._raw[i % 4])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:120]!r}")

    async def hold(self, path: str, i: int) -> Held:
        """Open one held stream through ``path``; return once its first token has arrived."""
        first = asyncio.get_running_loop().create_future()
        if path == "gateway_http":
            conn = await HttpConnection.open("127.0.0.1", self.port)
            status = await conn.start_stream(self._raw_hold)
            if status != 200:
                raise RuntimeError(f"HTTP {status} opening a held stream")
            await conn.first_event()
            return Held(asyncio.create_task(conn.drain_until_closed()), conn)
        sampling = SamplingOptions(HOLD_MIN_TOKENS * 2)
        if path == "direct_worker_grpc":
            stream = self.clients[i % 2].generate(EngineRequest(f"hd{next(_ids)}", self.prompt_ids, sampling))
        else:
            stream = self.core.generate(RoutingRequest(f"hr{next(_ids)}", MODEL, self.prompt_ids, sampling))

        async def read() -> None:
            async for _ in stream:
                if not first.done():
                    first.set_result(None)

        task = asyncio.create_task(read())
        await asyncio.wait((first, task), return_when=asyncio.FIRST_COMPLETED)
        if not first.done():  # the stream ended or failed before its first token
            first.cancel()
            task.result()
            raise RuntimeError("a held stream ended before its first token")
        return Held(task)


_METRICS_GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
_GC_SERIES = re.compile(r"^(switchyard_gc_pause_seconds_(?:count|sum|bucket))(\{[^}]*\}) (\S+)$", re.M)


def gc_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Garbage-collector pauses in the gateway between two scrapes: how many, how long in
    total, and how many lasted over 5 ms (all generations together)."""

    def total(suffix: str, label: str = "") -> float:
        keys = [k for k in after if k.startswith(f"switchyard_gc_pause_seconds_{suffix}") and label in k]
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    pauses = total("count")
    return {
        "pauses": pauses,
        "total_ms": total("sum") * 1000,
        "over_5ms": pauses - total("bucket", 'le="0.005"'),
    }


def _summary(lat_ms: list[float], errors: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": len(lat_ms), "errors": sum(errors.values()), "error_kinds": errors}
    if lat_ms:
        out |= {"p50_ms": pct(lat_ms, 0.5), "p99_ms": pct(lat_ms, 0.99), "mean_ms": statistics.fmean(lat_ms)}
        out["max_ms"] = max(lat_ms)
    return out


async def _timed(
    fn: Callable[[int], Awaitable[None]], i: int, lat: list[float], errors: dict[str, int]
) -> None:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            await fn(i)
    except Exception as exc:  # counted and reported; one failure must not hide the rest
        kind = f"{type(exc).__name__}: {str(exc)[:80]}"
        errors[kind] = errors.get(kind, 0) + 1
        return
    lat.append((time.perf_counter() - t0) * 1000.0)


class Cpu:
    """CPU seconds of the three processes over one measured stretch."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        me = psutil.Process().cpu_times()
        return {"loadgen": me.user + me.system, **{k: cpu_seconds(p) for k, p in self.pids.items()}}

    def per_request_us(self, n: int) -> dict[str, float]:
        end = self._now()
        return {k: (end[k] - self.start[k]) / max(n, 1) * 1e6 for k in end}


async def sequential(paths: Paths, path: str, n: int, pids: dict[str, int]) -> dict[str, Any]:
    fn = paths.request_fn(path)
    if path == "gateway_http":
        await paths.reset_connections(1)
    lat: list[float] = []
    errors: dict[str, int] = {}
    cpu = Cpu(pids)
    for i in range(n):
        await _timed(fn, i, lat, errors)
    return _summary(lat, errors) | {"cpu_us_per_request": cpu.per_request_us(n)}


async def burst(paths: Paths, path: str, n: int, pids: dict[str, int]) -> dict[str, Any]:
    fn = paths.request_fn(path)
    if path == "gateway_http":
        await paths.reset_connections(n)
        await asyncio.sleep(0.2)
    lat: list[float] = []
    errors: dict[str, int] = {}
    go = asyncio.Event()

    async def one(i: int) -> None:
        await go.wait()
        await _timed(fn, i, lat, errors)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0)
    cpu = Cpu(pids)
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    out = _summary(lat, errors) | {"batch_wall_s": wall, "requests_per_s": len(lat) / wall}
    return out | {"cpu_us_per_request": cpu.per_request_us(n)}


async def held(
    paths: Paths, path: str, n_streams: int, n_probes: int, pids: dict[str, int], tick_s: float
) -> dict[str, Any]:
    fn = paths.request_fn(path)
    streams: list[Held] = []
    t_open = time.perf_counter()
    try:
        for start in range(0, n_streams, 100):
            batch = range(start, min(n_streams, start + 100))
            streams += await asyncio.gather(*(paths.hold(path, i) for i in batch))
        open_s = time.perf_counter() - t_open
        if path == "gateway_http":
            await paths.reset_connections(1)
        await asyncio.sleep(0.5)  # let the opening settle; the trickle of tokens continues
        cpu = Cpu(pids)  # a window of forwarding tokens only: CPU per streamed token
        await asyncio.sleep(HOLD_CPU_WINDOW_S)
        per_token = cpu.per_request_us(round(n_streams * HOLD_CPU_WINDOW_S / tick_s))
        lat: list[float] = []
        errors: dict[str, int] = {}
        gc_before = await paths.gateway_gc() if path == "gateway_http" else None
        for i in range(n_probes):
            await _timed(fn, i, lat, errors)
        gc_during = gc_delta(gc_before, await paths.gateway_gc()) if gc_before is not None else None
        alive = sum(not s.task.done() for s in streams)
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    await asyncio.sleep(0.5)  # the servers abort the closed streams before the next measurement
    out = _summary(lat, errors) | {"streams_open": n_streams, "streams_alive_after": alive, "open_s": open_s}
    if gc_during is not None:
        out["gateway_gc_during_probes"] = gc_during
    return out | {"cpu_us_per_streamed_token": per_token}


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rounds if "p99_ms" in r]
    out: dict[str, Any] = {"rounds": rounds, "errors": sum(r["errors"] for r in rounds)}
    if ok:
        out["p50_ms"] = statistics.median(r["p50_ms"] for r in ok)
        out["p99_ms"] = statistics.median(r["p99_ms"] for r in ok)
    for key in ("cpu_us_per_request", "cpu_us_per_streamed_token"):
        cpus = [r[key] for r in ok if key in r]
        if cpus:
            out[key] = {k: statistics.median(c[k] for c in cpus) for k in cpus[0]}
    return out


def _compare(by_path: dict[str, Any]) -> None:
    """Added latency and ratio against direct, per round (same moment on the box), then the median."""
    direct_rounds = by_path["direct_worker_grpc"]["rounds"]
    for name in PATHS[1:]:
        r = by_path[name]
        pairs = [
            (p, d) for p, d in zip(r["rounds"], direct_rounds, strict=True) if "p99_ms" in p and "p99_ms" in d
        ]
        if not pairs:
            continue
        for q in ("p50", "p99"):
            r[f"added_{q}_ms_vs_direct"] = statistics.median(p[f"{q}_ms"] - d[f"{q}_ms"] for p, d in pairs)
            r[f"ratio_{q}_vs_direct"] = statistics.median(p[f"{q}_ms"] / d[f"{q}_ms"] for p, d in pairs)
            r[f"added_{q}_ms_per_round"] = [p[f"{q}_ms"] - d[f"{q}_ms"] for p, d in pairs]


async def bench_e2e(
    *,
    streams: int,
    rounds: int,
    probes: int,
    policy: str,
    hold_tick_s: float,
    loop: EventLoopName,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from switchyard.router.gateway.tokenizer import TokenizerAdapter
    from switchyard.testing.tiny_model import build_tiny_model

    prompt_ids = TokenizerAdapter.from_model_dir(build_tiny_model()).encode(PROMPT)
    workers = await asyncio.to_thread(Child, workers_child, MODEL, 2, hold_tick_s)
    gateway = await asyncio.to_thread(Child, gateway_child, MODEL, workers.reply, policy, loop)
    pids = {"gateway": gateway.pid, "workers": workers.pid}
    paths = Paths(workers.reply, gateway.reply, prompt_ids, policy)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {p: [] for p in PATHS} for s in ("sequential", "held", "burst")
    }
    try:
        await paths.start()
        for path in PATHS:  # warm-up: connections, channels, caches; not recorded
            await sequential(paths, path, 50, pids)
            await burst(paths, path, min(streams, 200), pids)
        for rnd in range(rounds):
            for path in PATHS:
                results["sequential"][path].append(await sequential(paths, path, probes, pids))
            for path in PATHS:
                results["held"][path].append(await held(paths, path, streams, probes, pids, hold_tick_s))
            for path in PATHS:
                results["burst"][path].append(await burst(paths, path, streams, pids))
            for scenario, by_path in results.items():
                nan = float("nan")
                line = " | ".join(
                    f"{p.split('_')[0]} {r[-1].get('p50_ms', nan):.2f}/{r[-1].get('p99_ms', nan):.2f}"
                    for p, r in by_path.items()
                )
                log(f"  round {rnd + 1} {scenario:10s} p50/p99 ms: {line}")
    finally:
        await paths.close()
        await asyncio.to_thread(gateway.stop)
        await asyncio.to_thread(workers.stop)
    out: dict[str, Any] = {}
    for scenario, by_path in results.items():
        out[scenario] = {p: _medians(r) for p, r in by_path.items()}
        _compare(out[scenario])
    g = out["held"]["gateway_http"]
    out["target_added_p99_ms"] = ADDED_P99_TARGET_MS
    out["target_met_held"] = g.get("added_p99_ms_vs_direct", float("inf")) < ADDED_P99_TARGET_MS
    out["target_met_burst"] = (
        out["burst"]["gateway_http"].get("added_p99_ms_vs_direct", float("inf")) < ADDED_P99_TARGET_MS
    )
    out["setup"] = {
        "streams": streams,
        "rounds": rounds,
        "probes_per_round": probes,
        "workers": 2,
        "policy": policy,
        "engine": "InstantEngine: one output with max_tokens (1-4) tokens at once; held streams 1 token"
        f" per {hold_tick_s} s",
        "prompt": PROMPT,
        "prompt_tokens": len(prompt_ids),
        "processes": "load generator | gateway + RouterCore | 2 workers; loopback",
        "event_loop": f"{loop} in the load generator and the gateway process; asyncio in the workers",
        "statistic": f"median over {rounds} rounds of each round's P50/P99; added and ratio: median over"
        " rounds of each round's difference and ratio against direct",
    }
    return out
