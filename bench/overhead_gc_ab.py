"""Interleaved A/B of the gateway's young-generation GC threshold, held scenario only.

Why a separate script: whole runs of ``bench.router_overhead`` taken minutes apart differed
by more than the effect being measured (this shared VM changes speed). Here two gateway
processes, identical except ``GatewayConfig.gc_young_threshold``, run side by side over the
same workers, and every round measures direct, A and B back to back, so a slow minute hits
all three. Reported per round: each path's P99 and the gateway's added P99 (minus direct).

    python -m bench.overhead_gc_ab --a 700 --b 10000 --rounds 6 --out bench/results/router-overhead-gc-ab
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.overhead_e2e import MODEL, PROMPT, Paths, held
from bench.overhead_servers import Child, gateway_child, workers_child
from bench.provenance import run_header
from switchyard import event_loop


async def _ab(a: int, b: int, rounds: int, streams: int, probes: int, policy: str) -> dict[str, Any]:
    from switchyard.router.gateway.tokenizer import TokenizerAdapter
    from switchyard.testing.tiny_model import build_tiny_model

    prompt_ids = TokenizerAdapter.from_model_dir(build_tiny_model()).encode(PROMPT)
    workers = await asyncio.to_thread(Child, workers_child, MODEL, 2, 1.0)
    gateways = {
        name: await asyncio.to_thread(Child, gateway_child, MODEL, workers.reply, policy, "uvloop", t)
        for name, t in (("a", a), ("b", b))
    }
    paths = {name: Paths(workers.reply, g.reply, prompt_ids, policy) for name, g in gateways.items()}
    out: list[dict[str, Any]] = []
    try:
        for p in paths.values():
            await p.start()
            await p.reset_connections(1)
        for rnd in range(rounds):
            pids = {"gateway": gateways["a"].pid, "workers": workers.pid}
            row: dict[str, Any] = {
                "direct_p99_ms": (await held(paths["a"], "direct_worker_grpc", streams, probes, pids, 1.0))[
                    "p99_ms"
                ]
            }
            for name in ("a", "b"):
                pids["gateway"] = gateways[name].pid
                r = await held(paths[name], "gateway_http", streams, probes, pids, 1.0)
                row[f"{name}_p99_ms"] = r["p99_ms"]
                row[f"{name}_added_p99_ms"] = r["p99_ms"] - row["direct_p99_ms"]
                row[f"{name}_gc"] = r.get("gateway_gc_during_probes")
            print(
                f"round {rnd + 1}: added P99 A {row['a_added_p99_ms']:.2f}, B {row['b_added_p99_ms']:.2f} ms",
                flush=True,
            )
            out.append(row)
    finally:
        for p in paths.values():
            await p.close()
        for g in gateways.values():
            await asyncio.to_thread(g.stop)
        await asyncio.to_thread(workers.stop)
    return {
        "rounds": out,
        "median_added_p99_ms": {
            n: statistics.median(r[f"{n}_added_p99_ms"] for r in out) for n in ("a", "b")
        },
        "rounds_b_lower": sum(r["b_added_p99_ms"] < r["a_added_p99_ms"] for r in out),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=int, default=700, help="gc_young_threshold of gateway A (700: Python's)")
    parser.add_argument("--b", type=int, default=10_000, help="gc_young_threshold of gateway B")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--policy", default="dualmap")
    parser.add_argument("--out", type=Path, default=Path("bench/results/router-overhead-gc-ab"))
    args = parser.parse_args(argv)
    started, load_before = dt.datetime.now(dt.UTC), os.getloadavg()
    ab = event_loop.run(_ab(args.a, args.b, args.rounds, args.streams, args.probes, args.policy))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        **run_header("bench.overhead_gc_ab", argv, started, load_before),
        "a": args.a,
        "b": args.b,
        **ab,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    med = ab["median_added_p99_ms"]
    print(
        f"median added P99: A ({args.a}) {med['a']:.2f} ms, B ({args.b}) {med['b']:.2f} ms;"
        f" B lower in {ab['rounds_b_lower']} of {args.rounds} rounds; wrote {args.out}/results.json"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
