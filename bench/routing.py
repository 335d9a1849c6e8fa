"""Routing benchmark: every registered policy x several arrival-rate scales on a simulated fleet.

Issue "DualMap routing" asks whether cache-affinity routing (DualMap) serves more load under a
TTFT SLO than load-only or hash-only routing, and at what cost in balance. Real GPUs are not
needed to compare *routing*: the calibrated simulator (sim-profiles.md) prices each engine
step, so a whole trace replays in virtual time in tens of seconds per run. The policy list
comes from the policy registry, so a newly registered policy joins the comparison unchanged.

    python -m bench.routing --trace PATH --format mooncake --instances 8 --slo-ttft-ms 2000 \
        --rates 1,1.5,2 --policies all --out bench/results/NAME

Writes ``NAME/results.json`` (every number, the command line, profile, SLO, trace, fleet),
``NAME/summary.md`` (the tables the README quotes), ``capacity.png`` and ``ttft_cdf.png``.
Runs are deterministic given ``--seed``; ``--jobs`` spreads runs over processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import metrics, plots, workloads
from bench import provenance as bench_provenance
from bench.oracle import ORACLE
from bench.replay import ReplayConfig, ReplayResult, engine_config, replay
from bench.report import render_summary
from bench.traces import Trace, load_trace, lru_hit_rate, prefix_hit_bound
from switchyard.router.policies import POLICIES, policy_params
from switchyard.workers.sim.cost import available_profiles, load_profile
from switchyard.workers.sim.instance import SimInstance

__all__ = ["main", "parse_args"]

_TRACE: Trace | None = None  # the run's trace, inherited by forked workers instead of pickled


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="trace file")
    p.add_argument("--format", required=True, choices=["mooncake", "azure", "servegen"])
    p.add_argument(
        "--servegen-dataset", default=None, help="ServeGen *-dataset.json (with --format servegen)"
    )
    p.add_argument("--instances", type=int, default=8, help="simulated instances in the fleet")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="TTFT SLO in milliseconds")
    p.add_argument("--target", type=float, default=0.9, help="fraction of requests that must meet the SLO")
    p.add_argument("--rates", default="0.5,1,1.5,2", help="comma-separated arrival-rate scales")
    p.add_argument("--profile", default="llama3.1-8b-h100", choices=available_profiles())
    p.add_argument("--compute-derate", type=float, default=1.0, help="sim-profiles.md §9.1: also try 0.7")
    p.add_argument("--policies", default="all", help="'all' (every registered policy) or a comma list")
    p.add_argument("--policy-params", default="{}", help='JSON: {"policy": {"param": value}}')
    p.add_argument("--load-report-interval-ms", type=float, default=50.0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="salt of the synthesized prompt tokens")
    p.add_argument("--start-s", type=float, default=0.0, help="trace window start (trace seconds)")
    p.add_argument("--duration-s", type=float, default=None, help="trace window length (trace seconds)")
    p.add_argument("--limit", type=int, default=None, help="at most this many requests")
    p.add_argument("--azure-prefix-groups", type=int, default=0, help="synthetic prefix groups (off: 0)")
    p.add_argument("--azure-prefix-tokens", type=int, default=0, help="shared prefix per group, tokens")
    w = p.add_argument_group("workload transformations (bench/workloads.py), applied in this order")
    w.add_argument("--sessions", action="store_true", help="string requests into multi-turn conversations")
    w.add_argument("--session-turns", type=float, default=3.0, help="mean turns per conversation")
    w.add_argument("--session-think-s", type=float, default=60.0, help="mean think time between turns")
    w.add_argument("--heads", type=int, default=0, help="prepend one of this many heads (Zipf popularity)")
    w.add_argument("--head-tokens", type=int, default=2048, help="tokens of each of --heads heads")
    w.add_argument("--head-zipf", type=float, default=1.0, help="Zipf exponent of --heads popularity")
    w.add_argument("--shared-head-tokens", type=int, default=0, help="prepend one head of N tokens to all")
    p.add_argument(
        "--routers", type=int, default=1, help="router replicas, each with its own view and a random share"
    )
    p.add_argument(
        "--cdf-scale", type=float, default=None, help="scale of ttft_cdf.png (default: see README)"
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (fork)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs already in OUT/results.json (same setup) except the (policy, scale) pairs rerun",
    )
    return p.parse_args(argv)


def _policies(spec: str) -> list[str]:
    known = sorted([*POLICIES, ORACLE])
    if spec == "all":
        return known
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(known)}")
    return names


def _run_task(task: tuple[str, ReplayConfig]) -> ReplayResult:
    assert _TRACE is not None
    return replay(_TRACE, task[0], task[1])


def _load(args: argparse.Namespace, max_model_len: int) -> tuple[Trace, int]:
    """The windowed trace without requests vLLM would reject (prompt + output > context)."""
    kwargs: dict[str, Any] = {"start_s": args.start_s, "duration_s": args.duration_s, "limit": args.limit}
    if args.format == "azure":
        kwargs |= {
            "prefix_groups": args.azure_prefix_groups,
            "prefix_tokens": args.azure_prefix_tokens,
            "seed": args.seed,
        }
    if args.format == "servegen":
        if not args.servegen_dataset:
            raise SystemExit("--format servegen needs --servegen-dataset (the client's *-dataset.json)")
        trace = workloads.load_servegen(args.trace, args.servegen_dataset, seed=args.seed, **kwargs)
    else:
        trace = load_trace(args.trace, args.format, **kwargs)
    trace = _transformed(args, trace)
    kept = tuple(r for r in trace.requests if r.input_length + r.output_length <= max_model_len)
    kept = tuple(dataclasses.replace(r, index=i) for i, r in enumerate(kept))
    return dataclasses.replace(trace, requests=kept), len(trace.requests) - len(kept)


def _transformed(args: argparse.Namespace, trace: Trace) -> Trace:
    """The workload transformations the command line asks for, in a fixed order: sessions
    first (they string the base requests together), then per-application heads, then the
    service-wide head in front of everything."""
    if args.sessions:
        params = workloads.SessionParams(
            mean_turns=args.session_turns, think_s=args.session_think_s, seed=args.seed
        )
        trace = workloads.as_sessions(trace, params)
    if args.heads:
        trace = workloads.with_zipf_heads(
            trace, count=args.heads, tokens=args.head_tokens, exponent=args.head_zipf, seed=args.seed
        )
    if args.shared_head_tokens:
        trace = workloads.with_shared_head(trace, args.shared_head_tokens)
    return trace


def _workload(args: argparse.Namespace) -> dict[str, Any]:
    """The transformations as recorded in results.json (part of what ``--merge`` compares)."""
    return {
        "sessions": {"mean_turns": args.session_turns, "think_s": args.session_think_s}
        if args.sessions
        else None,
        "heads": {"count": args.heads, "tokens": args.head_tokens, "zipf": args.head_zipf}
        if args.heads
        else None,
        "shared_head_tokens": args.shared_head_tokens,
        "servegen_dataset": args.servegen_dataset,
    }


_COMPAT_KEYS = (
    "trace",
    "profile",
    "instances",
    "slo",
    "load_report_interval_s",
    "seed",
    "workload",
    "routers",
)
"""What must agree for ``--merge`` to put runs of two invocations into one document."""


def main(argv: Sequence[str] | None = None) -> int:
    global _TRACE
    args = parse_args(argv)
    t_start = time.perf_counter()
    command = "python -m bench.routing " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo_s = args.slo_ttft_ms / 1000.0
    scales = sorted({float(s) for s in args.rates.split(",") if s.strip()})
    policies = _policies(args.policies)
    provenance = bench_provenance.provenance(policies)  # now: the code the forked workers will run
    given: dict[str, dict[str, Any]] = json.loads(args.policy_params)
    # An SLO-aware policy is deployed with the service's SLO (as RouterCore gives it): measuring
    # it against another SLO than the one it is told about would measure a misconfiguration.
    params = {
        p: {} if p == ORACLE else policy_params(p, given.get(p), ttft_slo_ms=args.slo_ttft_ms)
        for p in policies
    }
    probe_instance = SimInstance.from_config(engine_config(args.profile, args.compute_derate))
    trace, dropped = _load(args, probe_instance.max_model_len)
    _TRACE = trace
    base = _describe(args, trace, dropped, probe_instance)
    base_rate = trace.rate
    print(
        f"{len(trace.requests)} requests ({dropped} over context dropped), {base_rate:.3f} req/s, "
        f"prefix-hit bound {base['prefix_hit_bound']['token_hit_rate']:.3f}; "
        f"{len(policies)} policies x {len(scales)} scales",
        file=sys.stderr,
    )
    tasks = [
        (
            policy,
            ReplayConfig(
                num_instances=args.instances,
                scale=scale,
                profile=args.profile,
                compute_derate=args.compute_derate,
                load_report_interval_s=args.load_report_interval_ms / 1000.0,
                policy_params=params[policy],
                seed=args.seed,
                routers=args.routers,
            ),
        )
        for scale in reversed(scales)  # the slowest (overloaded) runs first, for a better packing
        for policy in policies
    ]
    results: list[ReplayResult] = []
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for res in pool.imap_unordered(_run_task, tasks):
                results.append(res)
                _progress(res, slo_s, len(results), len(tasks))
    else:
        for task in tasks:
            results.append(_run_task(task))
            _progress(results[-1], slo_s, len(results), len(tasks))

    doc: dict[str, Any] = {**base, "policies": {}, "invocations": []}
    old_path = out / "results.json"
    kept: dict[str, list[dict[str, Any]]] = {}  # policy -> earlier runs at scales not rerun now
    if args.merge and old_path.exists():
        old = json.loads(old_path.read_text(encoding="utf-8"))
        changed = [k for k in _COMPAT_KEYS if old.get(k) != base[k]]
        if changed:
            raise SystemExit(f"--merge: {old_path} differs in {changed}; use another --out")
        doc["invocations"] = old["invocations"]
        for name, entry in old["policies"].items():
            same = name not in policies or (
                entry["params"] == params[name] and entry["source"] == provenance["policy_sources"][name]
            )
            if not same:
                print(
                    f"--merge: {name} changed (code or params); its earlier runs are dropped", file=sys.stderr
                )
                continue
            kept[name] = [r for r in entry["runs"] if name not in policies or r["scale"] not in scales]
            doc["policies"][name] = entry
    invocation = len(doc["invocations"])
    runs = [{**metrics.summarize(r, slo_s, base_rate), "invocation": invocation} for r in results]
    for policy in set(policies) | set(kept):
        mine = kept.get(policy, []) + [r for r in runs if r["policy"] == policy]
        mine.sort(key=lambda r: r["scale"])
        cap = metrics.capacity([(r["scale"], r["slo_attainment"]) for r in mine], args.target)
        entry = doc["policies"].get(policy) or {
            "params": params[policy],
            "source": provenance["policy_sources"][policy],
        }
        doc["policies"][policy] = {
            "params": entry["params"],
            "source": entry["source"],
            "capacity_scale": cap.scale,
            "capacity_scale_interp": cap.scale_interp,
            "capacity_req_s": cap.scale * base_rate if cap.scale is not None else None,
            "capacity_saturated": cap.saturated,
            "runs": mine,
        }
    doc["policies"] = dict(sorted(doc["policies"].items()))
    all_runs = [r for p in doc["policies"].values() for r in p["runs"]]
    doc["scales"] = sorted({r["scale"] for r in all_runs})
    cdf_scale = args.cdf_scale if args.cdf_scale is not None else _default_cdf_scale(doc, args.target)
    doc["cdf_scale"] = cdf_scale
    wall_s = time.perf_counter() - t_start
    doc["invocations"].append(
        {
            "command": command,
            "policies": policies,
            "provenance": {k: v for k, v in provenance.items() if k != "policy_sources"},
            "python": platform.python_version(),
            "wall_s": wall_s,
            "jobs": args.jobs,
            "runs": len(results),
            "sum_of_run_wall_s": sum(r.wall_s for r in results),
            "sum_of_run_cpu_s": sum(r.cpu_s for r in results),
            "load_average_at_end": list(os.getloadavg()),
        }
    )
    old_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(render_summary(doc), encoding="utf-8")
    title = f"{Path(args.trace).name}, {args.instances} x {args.profile}, TTFT SLO {slo_s:g} s"
    plots.plot_capacity(
        all_runs, slo_s=slo_s, target=args.target, base_rate=base_rate, title=title, path=out / "capacity.png"
    )
    plots.plot_ttft_cdf(
        {r["policy"]: r["ttft_quantiles_s"] for r in all_runs if r["scale"] == cdf_scale},
        slo_s=slo_s,
        scale=cdf_scale,
        title=title,
        path=out / "ttft_cdf.png",
    )
    print(f"wrote {out}/ in {wall_s:.0f} s", file=sys.stderr)
    return 0


def _default_cdf_scale(doc: dict[str, Any], target: float) -> float:
    """The highest scale every policy ran at where at least one policy still meets the target:
    where the policies separate (the best still passes, the others show how they fail)."""
    common = set(doc["scales"])
    for p in doc["policies"].values():
        common &= {r["scale"] for r in p["runs"]}
    passing = [
        r["scale"]
        for p in doc["policies"].values()
        for r in p["runs"]
        if r["scale"] in common and r["slo_attainment"] >= target
    ]
    return float(max(passing) if passing else min(common or doc["scales"]))


def _describe(args: argparse.Namespace, trace: Trace, dropped: int, probe: SimInstance) -> dict[str, Any]:
    """The parts of the document that depend on the setup, not on the runs."""
    slo_s = args.slo_ttft_ms / 1000.0
    bound = prefix_hit_bound(trace.requests, engine_block=probe.block_size)
    kv_tokens = probe.num_kv_blocks * probe.block_size
    profile = load_profile(args.profile)
    chunk = profile.engine.max_num_batched_tokens
    reqs = trace.requests
    idle_cold = np.array([metrics.idle_ttft_s(probe.cost, r.input_length, 0, chunk) for r in reqs])
    idle_warm = np.array(
        [
            metrics.idle_ttft_s(probe.cost, r.input_length, h, chunk)
            for r, h in zip(reqs, bound.per_request, strict=True)
        ]
    )
    return {
        "trace": {
            "path": args.trace,
            "format": args.format,
            "window": {"start_s": args.start_s, "duration_s": args.duration_s, "limit": args.limit},
            "azure_prefix_groups": args.azure_prefix_groups,
            "azure_prefix_tokens": args.azure_prefix_tokens,
            "requests": len(reqs),
            "dropped_over_context": dropped,
            "span_s": trace.span_s,
            "base_rate_req_s": trace.rate,
            "input_tokens_mean": float(np.mean([r.input_length for r in reqs])),
            "output_tokens_mean": float(np.mean([r.output_length for r in reqs])),
        },
        "profile": {
            "name": args.profile,
            "id": profile.id,
            "compute_derate": args.compute_derate,
            "block_size": probe.block_size,
            "kv_cache_tokens_per_instance": kv_tokens,
            "max_model_len": probe.max_model_len,
        },
        "instances": args.instances,
        "routers": args.routers,
        "workload": _workload(args),
        "slo": {"ttft_s": slo_s, "target_attainment": args.target},
        "load_report_interval_s": args.load_report_interval_ms / 1000.0,
        "seed": args.seed,
        "prefix_hit_bound": bound.as_dict(),
        "slo_feasible_fraction": {
            "_what": "requests whose TTFT alone on an idle instance is within the SLO: an attainment ceiling",
            "cold_cache": metrics.slo_attainment(idle_cold, slo_s),
            "best_cache": metrics.slo_attainment(idle_warm, slo_s),
        },
        "lru_fleet_kv_reference_hit_rate": lru_hit_rate(reqs, kv_tokens * args.instances),
    }


def _progress(res: ReplayResult, slo_s: float, done: int, total: int) -> None:
    att = metrics.slo_attainment(res.ttft_s, slo_s)
    print(
        f"[{done}/{total}] {res.policy:>16} x{res.scale:<6g} attainment {att:.3f} "
        f"hit {res.cached_tokens / max(1, res.prompt_tokens):.3f} "
        f"({res.wall_s:.0f} s, cpu {res.cpu_s:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
