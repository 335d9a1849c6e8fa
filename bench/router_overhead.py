"""Router-overhead benchmark for the "DualMap routing" issue.

Why: the issue sets two budgets for the router itself, independent of any engine: a routing
decision P99 under 100 µs for 8k-token prompts, and gateway+router added P99 under 2 ms at
1,000 concurrent streams. This script measures both in one run, each as a ratio against a
direct baseline taken in the same run, so a shared or slow box shifts both sides alike:

1. Per-decision cost of every registered policy on 8 instances with 8k-token prompts drawn
   from shared-prefix groups, against a trivial "return the first instance" call.
2. End-to-end latency of 1,000 concurrent requests against an engine that answers instantly,
   sent (a) directly to the workers over gRPC (baseline), (b) through ``RouterCore.generate``
   in-process, and (c) through the HTTP gateway with httpx.

The load generator runs in the same process and event loop as the gateway, router and
workers (loopback only), so the end-to-end numbers include client cost and event-loop
queueing of 1,000 tasks on one core; they are an upper bound on what the router adds.

    python -m bench.router_overhead --out bench/results/router-overhead [--streams 1000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from switchyard.config import GatewayConfig, RouterConfig
from switchyard.errors import MigrationError
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    InstanceInfo,
    KvSnapshot,
    LoadReport,
    Membership,
    RoutingRequest,
    SamplingOptions,
    SuspendedRequest,
)
from switchyard.router.core import RouterCore
from switchyard.router.gateway import build_gateway_app, serve_gateway, stop_gateway
from switchyard.router.gateway.tokenizer import TokenizerAdapter
from switchyard.router.policies import POLICIES, make_policy
from switchyard.router.registry import FleetView, InstanceRegistry
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.tiny_model import TINY_MODEL_NAME, build_tiny_model
from switchyard.workers.worker_server import start_worker_server

MODEL = TINY_MODEL_NAME
N_INSTANCES = 8
PROMPT_TOKENS = 8192
PREFIX_GROUPS = 16
PREFIX_TOKENS = 6144
VARIANTS_PER_GROUP = 8
DECISION_P99_TARGET_US = 100.0
ADDED_P99_TARGET_MS = 2.0


class InstantEngine:
    """An ``Engine`` that finishes every request at once with ``max_tokens`` tokens."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.running = 0

    @property
    def block_size(self) -> int:
        return 32

    @property
    def max_model_len(self) -> int:
        return 2048

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        n = req.sampling.max_tokens
        tokens = [100 + i for i in range(n)]
        yield EngineOutput(req.request_id, tokens, True, FinishReason.LENGTH, len(req.prompt_token_ids), 0)

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


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest-rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize_us(ns: Sequence[int]) -> dict[str, float]:
    us = [v / 1000.0 for v in ns]
    return {
        "p50_us": pct(us, 0.5),
        "p99_us": pct(us, 0.99),
        "mean_us": statistics.fmean(us),
        "max_us": max(us),
    }


# --- 1. per-decision cost ------------------------------------------------------------------


def build_fleet() -> tuple[InstanceRegistry, FleetView, list[InstanceInfo]]:
    infos = [InstanceInfo(f"w{i}", f"127.0.0.1:{10000 + i}", MODEL, engine="sim") for i in range(N_INSTANCES)]
    registry = InstanceRegistry()
    registry.apply(Membership(1, tuple(infos)))
    rng = random.Random(1)
    for info in infos:
        registry.on_load_report(
            info.instance_id,
            LoadReport(
                info.instance_id,
                timestamp=time.monotonic(),
                num_running=rng.randint(0, 16),
                num_waiting=rng.randint(0, 4),
                waiting_prefill_tokens=rng.randint(0, 20000),
                kv_blocks_used=rng.randint(0, 900),
                kv_blocks_total=1000,
                step_time_s=0.02,
            ),
        )
    return registry, registry.fleet(MODEL), infos


def build_prompts() -> list[list[int]]:
    """Prompts of 8,192 tokens: 16 groups sharing a 6,144-token prefix, 8 suffixes each."""
    rng = random.Random(2)
    prompts = []
    for _group in range(PREFIX_GROUPS):
        prefix = [rng.randrange(1, 50000) for _ in range(PREFIX_TOKENS)]
        for _ in range(VARIANTS_PER_GROUP):
            suffix = [rng.randrange(1, 50000) for _ in range(PROMPT_TOKENS - PREFIX_TOKENS)]
            prompts.append(prefix + suffix)
    rng.shuffle(prompts)
    return prompts


def time_decisions(
    name: str,
    choose: Callable[[RoutingRequest, FleetView], Any],
    after: Callable[[RoutingRequest, Any], None] | None,
    fleet: FleetView,
    prompts: list[list[int]],
    n: int,
) -> dict[str, Any]:
    sampling = SamplingOptions(max_tokens=16)
    reqs = [RoutingRequest(f"{name}-{i}", MODEL, prompts[i % len(prompts)], sampling) for i in range(n)]
    warm = min(500, n // 10)
    wall: list[int] = []
    cpu: list[int] = []
    pc, tt = time.perf_counter_ns, time.thread_time_ns
    t_start_wall, t_start_cpu = pc(), tt()
    for i, req in enumerate(reqs):
        w0, c0 = pc(), tt()
        decision = choose(req, fleet)
        c1, w1 = tt(), pc()
        if i >= warm:
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
        if after is not None:
            after(req, decision)
    total_wall_s = (pc() - t_start_wall) / 1e9
    total_cpu_s = (tt() - t_start_cpu) / 1e9
    out: dict[str, Any] = {"decisions": len(wall)}
    out["wall"] = summarize_us(wall)
    out["cpu"] = summarize_us(cpu)
    # Throughput of choose() alone on one core (sum of timed decisions), CPU-time based.
    out["decisions_per_s_cpu"] = len(cpu) / (sum(cpu) / 1e9) if sum(cpu) else float("inf")
    out["decisions_per_s_wall"] = len(wall) / (sum(wall) / 1e9) if sum(wall) else float("inf")
    out["loop_wall_s_incl_feedback"] = total_wall_s
    out["loop_cpu_s_incl_feedback"] = total_cpu_s
    return out


def bench_decisions(n: int) -> dict[str, Any]:
    _, fleet, infos = build_fleet()
    prompts = build_prompts()
    first = next(iter(fleet))

    def trivial(req: RoutingRequest, fv: FleetView) -> Any:
        return first

    results: dict[str, Any] = {
        "setup": {
            "instances": N_INSTANCES,
            "prompt_tokens": PROMPT_TOKENS,
            "prefix_groups": PREFIX_GROUPS,
            "shared_prefix_tokens": PREFIX_TOKENS,
            "distinct_prompts": len(prompts),
            "timed": "choose() only; on_dispatched/on_finished run outside the timer",
        }
    }
    results["baseline_trivial"] = time_decisions("trivial", trivial, None, fleet, prompts, n)
    base_wall = results["baseline_trivial"]["wall"]["p50_us"]
    base_cpu = results["baseline_trivial"]["cpu"]["p50_us"]
    policies: dict[str, Any] = {}
    for name in sorted(POLICIES):
        policy = make_policy(name)
        policy.on_membership(infos)
        pending: list[tuple[str, str]] = []

        def after(req: RoutingRequest, decision: Any, policy: Any = policy, pending: Any = pending) -> None:
            policy.on_dispatched(req, decision)
            pending.append((req.request_id, decision.instance_id))
            if len(pending) > 64:  # keep ~64 requests in flight, like a busy router
                rid, iid = pending.pop(0)
                policy.on_finished(rid, iid, num_cached_tokens=0)

        r = time_decisions(name, policy.choose, after, fleet, prompts, n)
        r["ratio_p50_wall_vs_trivial"] = r["wall"]["p50_us"] / base_wall if base_wall else None
        r["ratio_p50_cpu_vs_trivial"] = r["cpu"]["p50_us"] / base_cpu if base_cpu else None
        r["p99_target_us"] = DECISION_P99_TARGET_US
        r["p99_target_met_wall"] = r["wall"]["p99_us"] < DECISION_P99_TARGET_US
        r["p99_target_met_cpu"] = r["cpu"]["p99_us"] < DECISION_P99_TARGET_US
        policies[name] = r
        print(
            f"  {name:16s} wall p50 {r['wall']['p50_us']:8.2f} µs p99 {r['wall']['p99_us']:8.2f} µs"
            f" | cpu p99 {r['cpu']['p99_us']:8.2f} µs | {r['decisions_per_s_cpu']:10.0f} dec/s",
            flush=True,
        )
    results["policies"] = policies
    return results


# --- 2. end-to-end ---------------------------------------------------------------------------


async def run_concurrent(n: int, one: Callable[[int], Awaitable[None]]) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    error_kinds: dict[str, int] = {}
    start = asyncio.Event()

    async def task(i: int) -> None:
        nonlocal errors
        await start.wait()
        t0 = time.perf_counter()
        try:
            await one(i)
        except Exception as exc:  # counted and reported; one failure must not hide the rest
            errors += 1
            kind = f"{type(exc).__name__}: {str(exc)[:80]}"
            error_kinds[kind] = error_kinds.get(kind, 0) + 1
            return
        lat.append((time.perf_counter() - t0) * 1000.0)

    tasks = [asyncio.create_task(task(i)) for i in range(n)]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    if not lat:
        return {"ok": 0, "errors": errors, "error_kinds": error_kinds}
    return {
        "ok": len(lat),
        "errors": errors,
        "error_kinds": error_kinds,
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "mean_ms": statistics.fmean(lat),
        "max_ms": max(lat),
        "batch_wall_s": elapsed,
        "requests_per_s": len(lat) / elapsed,
    }


async def bench_e2e(streams: int, policy: str) -> dict[str, Any]:
    engines = [InstantEngine(f"w{i}") for i in range(2)]
    servers = []
    infos: list[InstanceInfo] = []
    for eng in engines:

        def info(port: int, iid: str = eng.instance_id) -> InstanceInfo:
            return InstanceInfo(iid, f"127.0.0.1:{port}", MODEL, engine="sim")

        server, port = await start_worker_server(eng, info, host="127.0.0.1", load_interval_s=0.05)
        servers.append(server)
        infos.append(info(port))

    core = RouterCore(RouterConfig(policy=policy))
    core.apply_membership(Membership(1, tuple(infos)))
    await core.start()
    for _ in range(500):
        if core.ready:
            break
        await asyncio.sleep(0.01)

    tokenizer = TokenizerAdapter.from_model_dir(build_tiny_model())
    prompt_text = "The quick brown fox jumps over the lazy dog."
    prompt_ids = tokenizer.encode(prompt_text)
    gw_cfg = GatewayConfig(port=0)
    app = build_gateway_app(core, tokenizers={MODEL: tokenizer}, config=gw_cfg)
    gw_server, gw_task, gw_port = await serve_gateway(app, gw_cfg)

    clients = [WorkerClient(i.address, instance_id=i.instance_id) for i in infos]
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gw_port}", limits=limits, timeout=httpx.Timeout(60.0)
    )

    def max_tokens(i: int) -> int:
        return 1 + i % 4

    async def direct(i: int) -> None:
        req = EngineRequest(f"d{i}-{time.perf_counter_ns()}", prompt_ids, SamplingOptions(max_tokens(i)))
        async for out in clients[i % 2].generate(req):
            if out.finished:
                break

    async def router_core(i: int) -> None:
        req = RoutingRequest(
            f"r{i}-{time.perf_counter_ns()}", MODEL, prompt_ids, SamplingOptions(max_tokens(i))
        )
        async for out in core.generate(req):
            if out.finished:
                break

    async def gateway(i: int) -> None:
        body = {"model": MODEL, "prompt": prompt_text, "max_tokens": max_tokens(i), "temperature": 0.0}
        r = await http.post("/v1/completions", json=body)
        r.raise_for_status()

    paths: dict[str, Callable[[int], Awaitable[None]]] = {
        "direct_worker_grpc": direct,
        "router_core_inprocess": router_core,
        "gateway_http": gateway,
    }
    results: dict[str, Any] = {}
    sequential: dict[str, Any] = {}
    try:
        # Warm every path (connections, channels, JIT-free but cache-warm), then measure.
        for fn in paths.values():
            await run_concurrent(min(streams, 200), fn)
        # Unloaded cost first: one request at a time, 200 each, no queueing behind others.
        for name, fn in paths.items():
            seq: list[float] = []
            for i in range(200):
                t0 = time.perf_counter()
                await fn(i)
                seq.append((time.perf_counter() - t0) * 1000.0)
            sequential[name] = {"n": len(seq), "p50_ms": pct(seq, 0.5), "p99_ms": pct(seq, 0.99)}
            print(f"  sequential {name:22s} p50 {pct(seq, 0.5):6.2f} ms p99 {pct(seq, 0.99):6.2f} ms")
        for name, fn in paths.items():
            results[name] = await run_concurrent(streams, fn)
            r = results[name]
            print(
                f"  {name:22s} p50 {r.get('p50_ms', 0):8.2f} ms p99 {r.get('p99_ms', 0):8.2f} ms"
                f" errors {r['errors']}",
                flush=True,
            )
    finally:
        await http.aclose()
        for c in clients:
            await c.close()
        await stop_gateway(gw_server, gw_task)
        await core.close()
        for s in servers:
            await s.stop(None)

    d = results["direct_worker_grpc"]
    for name in ("router_core_inprocess", "gateway_http"):
        r = results[name]
        if "p99_ms" in r and "p99_ms" in d:
            r["added_p50_ms_vs_direct"] = r["p50_ms"] - d["p50_ms"]
            r["added_p99_ms_vs_direct"] = r["p99_ms"] - d["p99_ms"]
            r["ratio_p50_vs_direct"] = r["p50_ms"] / d["p50_ms"]
            r["ratio_p99_vs_direct"] = r["p99_ms"] / d["p99_ms"]
    results["sequential_concurrency_1"] = sequential
    g = results["gateway_http"]
    results["target_added_p99_ms"] = ADDED_P99_TARGET_MS
    results["target_met"] = g.get("added_p99_ms_vs_direct", float("inf")) < ADDED_P99_TARGET_MS
    results["setup"] = {
        "streams": streams,
        "workers": 2,
        "policy": policy,
        "engine": "InstantEngine: one EngineOutput with max_tokens (1-4) tokens, finished=True",
        "prompt": prompt_text,
        "prompt_tokens": len(prompt_ids),
        "load_generator": "same process and event loop as gateway, router and workers; loopback",
    }
    return results


# --- output -------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    e2e = results["e2e"]
    names = ["direct_worker_grpc", "router_core_inprocess", "gateway_http"]
    names = [n for n in names if "p50_ms" in e2e[n]]
    x = range(len(names))
    ax1.bar([i - 0.2 for i in x], [e2e[n]["p50_ms"] for n in names], 0.4, label="P50")
    ax1.bar([i + 0.2 for i in x], [e2e[n]["p99_ms"] for n in names], 0.4, label="P99")
    ax1.set_xticks(list(x), names, rotation=10)
    ax1.set_ylabel("latency (ms)")
    ax1.set_title(f"{e2e['setup']['streams']} concurrent requests, instant engine")
    ax1.legend()

    dec = results["decisions"]
    pnames = ["baseline_trivial", *sorted(dec["policies"])]
    rows = [dec["baseline_trivial"], *(dec["policies"][n] for n in sorted(dec["policies"]))]
    xs = range(len(pnames))
    ax2.bar([i - 0.2 for i in xs], [r["wall"]["p99_us"] for r in rows], 0.4, label="P99 wall")
    ax2.bar([i + 0.2 for i in xs], [r["cpu"]["p99_us"] for r in rows], 0.4, label="P99 thread CPU")
    ax2.axhline(DECISION_P99_TARGET_US, color="red", linestyle="--", label="100 µs target")
    ax2.set_xticks(list(xs), pnames, rotation=30, ha="right")
    ax2.set_ylabel("decision latency (µs)")
    ax2.set_yscale("log")
    ax2.set_title(f"choose() on {N_INSTANCES} instances, {PROMPT_TOKENS}-token prompts")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/router-overhead"))
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--policy", default="dualmap", help="router policy for the end-to-end part")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    print("decisions:", flush=True)
    decisions = bench_decisions(args.decisions)
    print("end-to-end:", flush=True)
    e2e = asyncio.run(bench_e2e(args.streams, args.policy))
    results = {
        "command": "python -m bench.router_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": (dt.datetime.now(dt.UTC) - started).total_seconds(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "decisions": decisions,
        "e2e": e2e,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.out / "router_overhead.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'router_overhead.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
