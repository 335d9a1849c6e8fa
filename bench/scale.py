"""Routing at fleet scale: decision cost from 8 to 1,024 instances, and keys remapped on a join.

Issue #15 asks what DualMap costs on a large fleet: the decision P50/P99 for 8k-token prompts
(target P99 < 100 µs), the router's CPU per request, and how many keys move when one instance
joins or leaves (target about 1/N per ring: a consistent hash moves only the keys of the
segments the instance's points split or release).

    python -m bench.scale --out bench/results/scale

Decisions are timed as in ``bench/overhead_decisions.py`` (a fresh prompt list per decision,
``choose`` alone timed, repetitions with the median reported), on fleets of 8, 64, 256 and
1,024 instances in two load regimes: **light** (every estimate under DualMap's switch: the
two-candidate path) and **overloaded** (every instance's queue over it: the SLO switch
compares ``switch_scan`` more instances per request, the policy's slowest path). Router CPU per
request is the thread CPU time of ``choose`` + ``on_dispatched`` + ``on_finished``.

Remapping: 200,000 random keys on each ring of a DualRing of N instances; the share of keys
whose ring-1 owner, ring-2 owner and candidate pair change when one instance joins, and when
one leaves, against 1/N.

Writes ``results.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import overhead_decisions as od
from bench import provenance as bench_provenance
from switchyard.messages import RoutingRequest, SamplingOptions
from switchyard.router.dual_ring import DualRing
from switchyard.router.policies import POLICIES, make_policy

__all__ = ["main"]

_LOADS = {"light": (0, 20_000), "overloaded": (200_000, 400_000)}


def _decisions(policy: str, n: int, load: str, decisions: int, reps: int) -> dict[str, Any]:
    fleet, infos = od.build_fleet(n, waiting_tokens=_LOADS[load])
    prompts = od.build_prompts()
    runs, cpu_per_request = [], []
    for _ in range(reps):
        pol = make_policy(policy)
        pol.on_membership(infos)
        after = od._feedback(pol)
        runs.append(od.time_once(policy, pol.choose, after, fleet, prompts, decisions))
        # Router CPU per request: the whole hook sequence, on the same warm policy.
        sampling = SamplingOptions(max_tokens=16)
        k = min(decisions, 500)  # requests built before the clock starts (8k-int lists)
        reqs = [
            RoutingRequest(f"cpu-{i}", od.MODEL, prompts[i % len(prompts)].tolist(), sampling)
            for i in range(k)
        ]
        t0 = time.thread_time_ns()
        for req in reqs:
            after(req, pol.choose(req, fleet))
        cpu_per_request.append((time.thread_time_ns() - t0) / k / 1000.0)
    out = od._median_of(runs)
    out["router_cpu_us_per_request"] = statistics.median(cpu_per_request)
    outcomes: dict[str, int] = {}
    pol = make_policy(policy)
    pol.on_membership(infos)
    for i in range(200):
        req = RoutingRequest(
            f"o-{i}", od.MODEL, prompts[i % len(prompts)].tolist(), SamplingOptions(max_tokens=16)
        )
        d = pol.choose(req, fleet)
        outcomes[d.outcome.value] = outcomes.get(d.outcome.value, 0) + 1
        pol.on_dispatched(req, d)
    out["outcomes_of_200"] = outcomes
    return out


def _remap(n: int, keys: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ids = [f"w{i}" for i in range(n)]
    ring = DualRing()
    ring.sync(ids)
    sample = [rng.getrandbits(64).to_bytes(8, "little") for _ in range(keys)]

    def owners() -> list[tuple[str, str, tuple[str, str]]]:
        out = []
        for k in sample:
            c = ring.candidates(k)
            out.append((ring.ring1.lookup(k) or "", ring.ring2.lookup(k) or "", c))
        return out

    before = owners()
    ring.add("joined")
    joined = owners()
    ring.remove("joined")
    ring.remove(ids[rng.randrange(n)])
    left = owners()

    def moved(after: list[tuple[str, str, tuple[str, str]]]) -> dict[str, float]:
        changed = [0, 0, 0]
        for x, y in zip(before, after, strict=True):
            for part in range(3):
                changed[part] += x[part] != y[part]
        return {name: c / keys for name, c in zip(("ring1", "ring2", "pair"), changed, strict=True)}

    return {
        "instances": n,
        "keys": keys,
        "expected_share": 1.0 / n,
        "join": moved(joined),
        "leave": moved(left),
    }


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = doc["sizes"]
    for load, style in (("light", "o-"), ("overloaded", "s--")):
        p99 = [doc["dualmap"][str(n)][load]["wall"]["p99_us"] for n in sizes]
        p50 = [doc["dualmap"][str(n)][load]["wall"]["p50_us"] for n in sizes]
        ax1.plot(sizes, p99, style, label=f"P99, {load}")
        ax1.plot(sizes, p50, style, alpha=0.5, label=f"P50, {load}")
    ax1.axhline(od.DECISION_P99_TARGET_US, color="red", lw=0.8, label="target P99")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("instances")
    ax1.set_ylabel("dualmap decision, µs (wall)")
    ax1.set_title("decision cost, 8,192-token prompts")
    ax1.legend(fontsize=7)
    r = doc["remap"]
    labels = ["join ring1", "join ring2", "join pair", "leave ring1", "leave ring2", "leave pair"]
    vals = [
        r["join"]["ring1"],
        r["join"]["ring2"],
        r["join"]["pair"],
        r["leave"]["ring1"],
        r["leave"]["ring2"],
        r["leave"]["pair"],
    ]
    ax2.bar(labels, [100 * v for v in vals])
    ax2.axhline(100 * r["expected_share"], color="red", lw=0.8, label="1/N")
    ax2.set_ylabel("keys remapped, %")
    ax2.set_title(f"one instance joins / leaves, N = {r['instances']}")
    ax2.tick_params(axis="x", rotation=30, labelsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="8,64,256,1024")
    p.add_argument("--decisions", type=int, default=5000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--remap-keys", type=int, default=200_000)
    args = p.parse_args(argv)
    command = "python -m bench.scale " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    doc: dict[str, Any] = {
        "sizes": sizes,
        "prompt_tokens": od.PROMPT_TOKENS,
        "dualmap": {},
        "policies_at_largest": {},
    }
    for n in sizes:
        doc["dualmap"][str(n)] = {}
        for load in _LOADS:
            r = _decisions("dualmap", n, load, args.decisions, args.reps)
            doc["dualmap"][str(n)][load] = r
            print(
                f"dualmap n={n:5d} {load:10s} p50 {r['wall']['p50_us']:6.1f} "
                f"p99 {r['wall']['p99_us']:6.1f} µs; "
                f"cpu/request {r['router_cpu_us_per_request']:6.1f} µs; {r['outcomes_of_200']}",
                file=sys.stderr,
                flush=True,
            )
    largest = max(sizes)
    for name in sorted(POLICIES):
        if name != "dualmap":
            r = _decisions(name, largest, "light", args.decisions, args.reps)
            doc["policies_at_largest"][name] = r
            print(f"{name} n={largest} p99 {r['wall']['p99_us']:.1f} µs", file=sys.stderr, flush=True)
    doc["remap"] = _remap(largest, args.remap_keys, seed=3)
    print(f"remap: {doc['remap']}", file=sys.stderr)
    doc["invocation"] = {
        "command": command,
        "provenance": {
            k: v for k, v in bench_provenance.provenance(["dualmap"]).items() if k != "policy_sources"
        },
        "python": platform.python_version(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "wall_s": time.perf_counter() - t0,
        "load_average_at_end": list(os.getloadavg()),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    _plot(doc, out / "scale.png")
    print(f"wrote {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
