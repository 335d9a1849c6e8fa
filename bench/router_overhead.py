"""Router-overhead benchmark for the "DualMap routing" issue.

Why: the issue sets two budgets for the router itself, independent of any engine: a routing
decision P99 under 100 µs for 8k-token prompts, and gateway+router added P99 under 2 ms at
1,000 concurrent streams. This script measures both in one run, each against a baseline
taken in the same run, so a shared or slow box shifts both sides alike:

1. Per-decision cost of every registered policy (``bench/overhead_decisions.py``).
2. End-to-end latency against an engine that answers at once, with the load generator, the
   gateway (with its router core) and the workers in three processes
   (``bench/overhead_e2e.py``): direct to the workers over gRPC (baseline), through
   ``RouterCore.generate`` in-process, and through the HTTP gateway; one request at a time,
   with 1,000 streams held open, and as a burst of 1,000 at once.

Then ``results.json``, ``summary.md`` and ``router_overhead.png`` go to ``--out``
(``bench/overhead_report.py``).

    python -m bench.router_overhead --out bench/results/router-overhead
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path

from bench.overhead_decisions import bench_decisions
from bench.overhead_e2e import bench_e2e
from bench.overhead_report import plot, write_summary
from bench.provenance import run_header
from switchyard import event_loop
from switchyard.event_loop import EVENT_LOOPS


def _log(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/router-overhead"))
    parser.add_argument("--streams", type=int, default=1000, help="held streams, and the burst size")
    parser.add_argument("--rounds", type=int, default=5, help="end-to-end rounds; medians are reported")
    parser.add_argument("--probes", type=int, default=2000, help="requests per sequential/held measurement")
    parser.add_argument("--hold-tick-s", type=float, default=1.0, help="a held stream's seconds per token")
    parser.add_argument("--decisions", type=int, default=20000, help="timed decisions per repetition")
    parser.add_argument("--decision-reps", type=int, default=5)
    parser.add_argument("--policy", default="dualmap", help="router policy for the end-to-end part")
    parser.add_argument(
        "--event-loop",
        choices=list(EVENT_LOOPS),
        default="uvloop",
        help="loop of the load generator and the gateway process (as `switchyard serve --event-loop`)",
    )
    parser.add_argument("--skip-decisions", action="store_true", help="end-to-end only (for profiling)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    decisions = {}
    if not args.skip_decisions:
        _log("decisions:")
        decisions = bench_decisions(args.decisions, args.decision_reps, log=_log)
    _log("end-to-end:")
    e2e = event_loop.run(
        bench_e2e(
            streams=args.streams,
            rounds=args.rounds,
            probes=args.probes,
            policy=args.policy,
            hold_tick_s=args.hold_tick_s,
            loop=args.event_loop,
            log=_log,
        ),
        loop=args.event_loop,
    )
    results = {
        **run_header("bench.router_overhead", argv, started, load_before),
        "decisions": decisions,
        "e2e": e2e,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if decisions:
        plot(results, args.out / "router_overhead.png")
        write_summary(results, args.out / "summary.md")
    _log(f"wrote {args.out}/results.json, summary.md and router_overhead.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
