"""Interleaved A/B of two versions of the gateway's code, in the router-overhead benchmark's setup.

Why: whole ``bench.router_overhead`` runs minutes apart differ by more than a change to the
gateway moves (the 2-core box is shared), so a change is measured against the code it replaces
in one run. Two gateway processes, each importing ``switchyard`` from its own source tree (a
git commit extracted with ``git archive``, or a directory), run over the same two workers;
every round starts fresh A and B processes and measures direct, A and B back to back (A/B
order alternating), so a slow minute hits all three and no process's own luck (an A/A run
showed one 10 % cheaper than the other, same code) lands on one side. The load generator and
the workers are this checkout's code.

Per round and side: the held scenario (``--streams`` streams open, one probe at a time: P50,
P99, added P99 over direct, gateway CPU per streamed token), the sequential one (gateway CPU
per request), and sequential streamed requests (4 tokens; CPU per request, the stream's start
and end included). Reported: each round's numbers, the medians, and the median over rounds of
each round's B/A ratio.

    python -m bench.gateway_ab --a e34744e --b . --rounds 6 --out bench/results/gateway-ab/NAME

Only the standard library is imported at module level: the gateway children are spawned, and
must import ``switchyard`` from their own tree, not the one this process loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def rooted_gateway_child(conn: Connection, root: str, *args: Any) -> None:
    """Process entry: ``bench.overhead_servers.gateway_child`` with ``switchyard`` from ``root``."""
    sys.path.insert(0, root)
    from bench.overhead_servers import gateway_child

    gateway_child(conn, *args)


def source_tree(spec: str, scratch: Path) -> tuple[str, str]:
    """A directory holding ``switchyard/`` for ``spec`` (a directory, or a git commit to extract),
    and a label saying which (the commit hash, or the directory and its HEAD)."""
    path = Path(spec)
    if (path / "switchyard").is_dir():
        git = ["git", "-C", spec]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "switchyard"], capture_output=True).stdout
        label = f"{path.resolve().name} at {head[:12]}{' + uncommitted changes' if dirty else ''}"
        return str(path.resolve()), label
    rev = subprocess.run(["git", "rev-parse", spec], capture_output=True, text=True, check=True)
    commit = rev.stdout.strip()
    out = scratch / commit[:12]
    if out.exists():  # A/A: both sides the same commit
        return str(out), commit
    out.mkdir()
    archive = subprocess.run(["git", "archive", commit, "switchyard"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out), commit


def _ratio_summary(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    pairs = [(r["a"][key], r["b"][key]) for r in rows if key in r["a"] and key in r["b"]]
    if not pairs:
        return {}
    return {
        "a_median": statistics.median(a for a, _ in pairs),
        "b_median": statistics.median(b for _, b in pairs),
        "b_over_a_median": statistics.median(b / a for a, b in pairs if a),
        "b_over_a_per_round": [round(b / a, 3) if a else None for a, b in pairs],
        "rounds_b_lower": sum(b < a for a, b in pairs),
    }


async def streamed_sequential(paths: Any, n: int, pids: dict[str, int]) -> dict[str, Any]:
    """``n`` streamed completions one at a time (4 tokens, delivered by the engine at once):
    latency and gateway CPU per request, the stream's start and end included."""
    from bench.http_load import post_request
    from bench.overhead_decisions import pct
    from bench.overhead_e2e import MODEL, PROMPT, Cpu

    raw = post_request("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True})
    await paths.reset_connections(1)
    conn = paths.conns[0]
    lat: list[float] = []
    cpu = Cpu(pids)
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = await conn.request(raw)
        lat.append((time.perf_counter() - t0) * 1000.0)
        if status != 200 or not body.endswith(b"data: [DONE]\n\n"):
            raise RuntimeError(f"HTTP {status}: {body[-120:]!r}")
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "cpu_us_per_request": cpu.per_request_us(n)}


async def _measure(paths: Any, pids: dict[str, int], direct: dict[str, Any], args: Any) -> dict[str, Any]:
    from bench.overhead_e2e import held, sequential

    h = await held(paths, "gateway_http", args.streams, args.probes, pids, 1.0)
    s = await sequential(paths, "gateway_http", args.probes, pids)
    st = await streamed_sequential(paths, args.probes, pids)
    return {
        "held_p50_ms": h["p50_ms"],
        "held_p99_ms": h["p99_ms"],
        "held_added_p99_ms": h["p99_ms"] - direct["p99_ms"],
        "held_errors": h["errors"],
        "gateway_cpu_us_per_streamed_token": h["cpu_us_per_streamed_token"]["gateway"],
        "gateway_gc_during_probes": h.get("gateway_gc_during_probes"),
        "sequential_p50_ms": s["p50_ms"],
        "sequential_p99_ms": s["p99_ms"],
        "gateway_cpu_us_per_request": s["cpu_us_per_request"]["gateway"],
        "streamed_p50_ms": st["p50_ms"],
        "streamed_p99_ms": st["p99_ms"],
        "gateway_cpu_us_per_streamed_request": st["cpu_us_per_request"]["gateway"],
    }


async def _ab(trees: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Per round: fresh A and B gateway processes (started in alternating order), then direct,
    A and B measured back to back. Fresh processes each round because one process can be
    consistently cheaper than another with the same code (an A/A run on the 2-core box: B's
    process 10 % lower in 4 of 4 rounds; hash seeds and memory layout differ per process)."""
    from bench.overhead_e2e import MODEL, PROMPT, Paths, held, sequential
    from bench.overhead_servers import Child, workers_child
    from switchyard.router.gateway.tokenizer import TokenizerAdapter
    from switchyard.testing.tiny_model import build_tiny_model

    prompt_ids = TokenizerAdapter.from_model_dir(build_tiny_model()).encode(PROMPT)
    workers = await asyncio.to_thread(Child, workers_child, MODEL, 2, 1.0)
    rows: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            order = ("a", "b") if rnd % 2 == 0 else ("b", "a")
            gateways: dict[str, Any] = {}
            paths: dict[str, Any] = {}
            try:
                for side in order:
                    gateways[side] = await asyncio.to_thread(
                        Child, rooted_gateway_child, trees[side], MODEL, workers.reply, args.policy, "uvloop"
                    )
                    paths[side] = Paths(workers.reply, gateways[side].reply, prompt_ids, args.policy)
                    await paths[side].start()
                    await sequential(paths[side], "gateway_http", 200, {"gateway": gateways[side].pid})
                direct = await held(paths["a"], "direct_worker_grpc", args.streams, args.probes, {}, 1.0)
                row: dict[str, Any] = {"direct_p99_ms": direct["p99_ms"], "direct_p50_ms": direct["p50_ms"]}
                for side in order:
                    pids = {"gateway": gateways[side].pid, "workers": workers.pid}
                    row[side] = await _measure(paths[side], pids, direct, args)
            finally:
                for p in paths.values():
                    await p.close()
                for g in gateways.values():
                    await asyncio.to_thread(g.stop)
            a, b = row["a"], row["b"]
            line = ", ".join(
                f"{label} A {a[key]:.{digits}f} B {b[key]:.{digits}f}"
                for label, key, digits in (
                    ("held added P99 ms", "held_added_p99_ms", 2),
                    ("CPU us/token", "gateway_cpu_us_per_streamed_token", 0),
                    ("CPU us/request", "gateway_cpu_us_per_request", 0),
                    ("CPU us/streamed request", "gateway_cpu_us_per_streamed_request", 0),
                )
            )
            print(f"round {rnd + 1} ({order[0]} first): {line}", flush=True)
            rows.append(row)
    finally:
        await asyncio.to_thread(workers.stop)
    keys = (
        "held_added_p99_ms",
        "held_p99_ms",
        "held_p50_ms",
        "gateway_cpu_us_per_streamed_token",
        "gateway_cpu_us_per_request",
        "sequential_p50_ms",
        "sequential_p99_ms",
        "gateway_cpu_us_per_streamed_request",
        "streamed_p50_ms",
        "streamed_p99_ms",
    )
    return {"rounds": rows, "summary": {k: _ratio_summary(rows, k) for k in keys}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="side A: a git commit, or a directory holding switchyard/")
    parser.add_argument("--b", default=".", help="side B (default: this checkout, uncommitted changes too)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--policy", default="dualmap")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from bench.provenance import run_header
    from switchyard import event_loop

    started, load_before = dt.datetime.now(dt.UTC), os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        (a_root, a_label), (b_root, b_label) = (source_tree(s, Path(scratch)) for s in (args.a, args.b))
        ab = event_loop.run(_ab({"a": a_root, "b": b_root}, args))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {**run_header("bench.gateway_ab", argv, started, load_before), "a": a_label, "b": b_label, **ab}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, r in ab["summary"].items():
        if r:
            print(
                f"{key}: A {r['a_median']:.3f}, B {r['b_median']:.3f}; B/A median {r['b_over_a_median']:.3f},"
                f" B lower in {r['rounds_b_lower']} of {args.rounds}"
            )
    print(f"wrote {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
