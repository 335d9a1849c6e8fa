"""Rebalancing benchmark: DualMap with and without the router's hotspot rebalancer, same trace.

Issue #4 asks whether live migration off hotspots improves P99 TTFT and P99 TPOT over DualMap
routing alone on a bursty trace. Routing can only place *new* requests; the rebalancer moves
requests already queued or running. Each rate scale is replayed twice in virtual time on the
same simulated fleet (``bench/replay.py``, the real policy and registry): once with routing
alone, once with the real planner (``plan_rebalance`` over ``fleet_loads`` of the router's
view) run every ``period_s`` as ``Rebalancer.run_once`` runs it, its moves applied one after
another by ``SimFleet.migrate``, which stages and prices them like the real protocol
(``sim_migration``). ``--policy`` swaps the router (a hotspot-prone one shows what the
mechanism can do where there is a hotspot to relieve).

    python -m bench.rebalance --trace ../shared/traces/azure_llm_2023_code.csv --format azure \
        --instances 8 --rates 20,22.5,25 --out bench/results/rebalance-azure-8 --jobs 2

Writes ``results.json`` (every number, the rebalancer, migration and transfer parameters, the
command and provenance), ``summary.md`` and ``latency_cdf.png`` (TTFT and TPOT CDFs, one row
per scale). ``--rebalancer '{"period_s": 0.25}'`` overrides ``RebalancerConfig`` fields, to
see why the default does or does not help; the headline runs use the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from bench import metrics, plots
from bench import provenance as bench_provenance
from bench.replay import ReplayConfig, ReplayResult, _Replay, engine_config
from bench.routing import _describe, _load, _params_for
from bench.traces import Trace
from switchyard.config import MigrationConfig, RebalancerConfig
from switchyard.router import rebalancer as rebalancer_module
from switchyard.router.policies import POLICIES
from switchyard.router.rebalancer import InstanceLoad, Move, fleet_loads, plan_rebalance
from switchyard.workers.sim_cost import KvTransferCost, KvTransferProfile, available_profiles, load_profile
from switchyard.workers.sim_instance import SimInstance
from switchyard.workers.sim_migration import SimMigrationOutcome

if TYPE_CHECKING:
    from switchyard.router.movable_stream import MovableStream

__all__ = ["main", "parse_args"]

_TRACE: Trace | None = None  # inherited by forked workers instead of pickled


@dataclasses.dataclass(frozen=True, slots=True)
class _StreamView:
    """What ``fleet_loads`` reads of a router stream (``MovableStream``), for one simulated request.

    ``num_tokens`` counts the prompt only once a first output arrived, as ``MovableStream`` does,
    so the planner sees queued requests as the cheapest to move, exactly as in the router.
    """

    instance_id: str
    moving: bool
    num_tokens: int


@dataclasses.dataclass(slots=True)
class RunResult:
    """One replay plus what its rebalancer did (empty without one)."""

    replay: ReplayResult
    tpot_quantiles_s: list[float]
    diagnosis: dict[str, int] = dataclasses.field(default_factory=dict)
    planned: list[Move] = dataclasses.field(default_factory=list)
    outcomes: list[SimMigrationOutcome] = dataclasses.field(default_factory=list)


class _RebalancingReplay(_Replay):
    """``_Replay`` with the router's rebalancer loop on the same virtual timeline.

    As in ``Rebalancer``: every ``period_s`` after the previous pass ended, drop cooled-down
    entries, snapshot the registry (``fleet_loads``), plan, and migrate the planned moves one at
    a time; a move's request is not picked again for ``request_cooldown_s``. Registry and policy
    accounting stay with the dispatch instance, as ``RouterCore`` keeps them after a move.
    """

    def __init__(self, trace: Trace, policy: str, cfg: ReplayConfig, rebalancer: RebalancerConfig) -> None:
        super().__init__(trace, policy, cfg)
        self.rebalancer = rebalancer
        self.moved_to: dict[int, str] = {}  # request index -> where a migration put it
        self.tried: dict[str, float] = {}
        self.diagnosis: Counter[str] = Counter()
        self.planned: list[Move] = []
        self.migrations: list[SimMigrationOutcome] = []

    def run(self) -> ReplayResult:
        self.fleet.call_at(self.rebalancer.period_s, self._pass)
        return super().run()

    def _streams(self) -> dict[str, _StreamView]:
        views: dict[str, _StreamView] = {}
        for idx, state in enumerate(self.where):
            if state is None:
                continue
            rid, n = f"r{idx}", self.generated[idx]
            views[rid] = _StreamView(
                self.moved_to.get(idx, state.instance_id),
                self.fleet.is_migrating(rid),
                (self.trace.requests[idx].input_length + n) if n else 0,
            )
        return views

    def _pass(self) -> None:
        if self.done >= len(self.trace.requests):
            return  # the run is over: stop, so the event loop drains
        now, cfg = self.fleet.now, self.rebalancer
        self.tried = {rid: t for rid, t in self.tried.items() if now - t < cfg.request_cooldown_s}
        streams = cast("Mapping[str, MovableStream]", self._streams())  # duck-typed: three fields read
        loads = fleet_loads(self.registry, streams)
        plan = plan_rebalance(loads, cfg, skip=self.tried.keys())
        self._diagnose(loads)
        self.diagnosis["planned_before_first_token"] += sum(
            1 for m in plan if streams[m.request_id].num_tokens == 0
        )
        self.planned.extend(plan)
        self._apply(plan, 0)

    def _diagnose(self, loads: Sequence[InstanceLoad]) -> None:
        """Count passes with an overloaded instance, and those where no instance could take work.

        Restates the planner's definitions (``switchyard.router.rebalancer`` docstring) for the
        report only: overloaded = ``waiting >= max_waiting`` or far above the mean queue; a
        destination must be neither and stay at or under the mean with one more request.
        """
        cfg = self.rebalancer
        queues = [ld.num_running + ld.num_waiting for ld in loads]
        mean = sum(queues) / max(1, len(queues))
        hot = [
            ld.num_waiting >= cfg.max_waiting
            or (q >= cfg.imbalance_ratio * mean and q - mean >= cfg.min_load_gap)
            for ld, q in zip(loads, queues, strict=True)
        ]
        self.diagnosis["passes"] += 1
        self.diagnosis["instances_waiting_sum"] += sum(ld.num_waiting > 0 for ld in loads)
        if any(hot):
            self.diagnosis["passes_with_overload"] += 1
            if not any(not h and q + 1 <= mean for h, q in zip(hot, queues, strict=True)):
                self.diagnosis["passes_with_overload_but_no_destination"] += 1

    def _apply(self, plan: Sequence[Move], i: int) -> None:
        if i == len(plan):
            self.fleet.call_at(self.fleet.now + self.rebalancer.period_s, self._pass)
            return
        move = plan[i]
        self.tried[move.request_id] = self.fleet.now

        def done(outcome: SimMigrationOutcome) -> None:
            self.migrations.append(outcome)
            if outcome.status in ("moved", "recomputed"):
                self.moved_to[int(move.request_id[1:])] = outcome.instance_id
            self._apply(plan, i + 1)

        self.fleet.migrate(move.request_id, move.source, move.destination, done)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rebalance", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="trace file")
    p.add_argument("--format", default="azure", choices=["mooncake", "azure"])
    p.add_argument("--instances", type=int, default=8)
    p.add_argument(
        "--policy", default="dualmap", choices=sorted(POLICIES), help="routing policy of both runs"
    )
    p.add_argument("--rates", default="20,22.5,25", help="comma-separated arrival-rate scales")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--profile", default="llama3.1-8b-h100", choices=available_profiles())
    p.add_argument("--compute-derate", type=float, default=1.0)
    p.add_argument("--load-report-interval-ms", type=float, default=50.0)
    p.add_argument("--rebalancer", default="{}", help="JSON overrides of RebalancerConfig fields")
    p.add_argument("--migration", default="{}", help="JSON overrides of MigrationConfig fields")
    p.add_argument("--kv-transfer", default="{}", help="JSON overrides of the profile's kv_transfer link")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-s", type=float, default=0.0)
    p.add_argument("--duration-s", type=float, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--azure-prefix-groups", type=int, default=0)
    p.add_argument("--azure-prefix-tokens", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (fork)")
    return p.parse_args(argv)


def _run_task(task: tuple[str, ReplayConfig, RebalancerConfig | None]) -> RunResult:
    assert _TRACE is not None
    policy, cfg, rebalancer = task
    if rebalancer is None:
        rep = _Replay(_TRACE, policy, cfg)
        res = rep.run()
        return RunResult(res, _tpot_quantiles(res))
    rrep = _RebalancingReplay(_TRACE, policy, cfg, rebalancer)
    res = rrep.run()
    return RunResult(res, _tpot_quantiles(res), dict(rrep.diagnosis), rrep.planned, rrep.migrations)


def _tpot_quantiles(res: ReplayResult) -> list[float]:
    tpot = res.tpot_s[~np.isnan(res.tpot_s)]
    return [round(float(v), 6) for v in np.percentile(tpot, metrics.CDF_QUANTILES)] if tpot.size else []


def _migration_stats(run: RunResult, bytes_per_block: int) -> dict[str, Any]:
    """What the rebalancer did in one run: plans, outcomes, pauses, bytes."""
    outs = run.outcomes
    moved = [o for o in outs if o.status in ("moved", "recomputed")]
    down = np.array([o.downtime_s for o in moved if o.downtime_s is not None])
    return {
        "passes": run.diagnosis.get("passes", 0),
        "passes_with_overload": run.diagnosis.get("passes_with_overload", 0),
        "passes_with_overload_but_no_destination": run.diagnosis.get(
            "passes_with_overload_but_no_destination", 0
        ),
        "mean_instances_queueing_per_pass": round(
            run.diagnosis.get("instances_waiting_sum", 0) / max(1, run.diagnosis.get("passes", 0)), 3
        ),
        "planned_moves": len(run.planned),
        "planned_by_reason": dict(Counter(m.reason for m in run.planned)),
        "planned_before_first_token": run.diagnosis.get("planned_before_first_token", 0),
        "outcomes": dict(Counter(o.status for o in outs)),
        "not_moved_reasons": dict(Counter(o.reason for o in outs if o.status not in ("moved", "recomputed"))),
        "migrations": len(moved),
        "moved_without_kv": sum(1 for o in moved if o.blocks_moved == 0),
        "stages": dict(Counter(str(o.stages) for o in moved)),
        "downtime_total_s": round(float(down.sum()), 6),
        "downtime_s": {f"p{q}": metrics.percentile(down, q) for q in (50, 99)} if down.size else {},
        "migration_total_s_mean": round(float(np.mean([o.total_s for o in moved])), 6) if moved else None,
        "blocks_moved": sum(o.blocks_moved for o in moved),
        "bytes_moved": sum(o.bytes_moved for o in moved),
        "bytes_per_block": bytes_per_block,
    }


def _misses_by_burst(res: ReplayResult, trace: Trace, slo_s: float, window_s: float = 5.0) -> dict[str, Any]:
    """Where the TTFT SLO misses arrive: the windows holding most of them, and their arrival counts.

    If misses cluster in a few windows whose arrivals far exceed the mean, the fleet as a whole
    was short of capacity then, and moving work between instances cannot help.
    """
    arrival = np.array([r.arrival_s for r in trace.requests]) / res.scale
    window = (arrival // window_s).astype(int)
    missed = ~(res.ttft_s <= slo_s)
    per_window = np.bincount(window)
    misses = np.bincount(window[missed], minlength=per_window.size)
    top = np.argsort(-misses, kind="stable")[:3]
    return {
        "window_s": window_s,
        "misses": int(missed.sum()),
        "mean_arrivals_per_window": round(float(len(arrival) / max(1, per_window.size)), 1),
        "top_windows": [
            {"start_s": float(w * window_s), "arrivals": int(per_window[w]), "misses": int(misses[w])}
            for w in top
        ],
        "fraction_of_misses_in_top_windows": round(float(misses[top].sum() / max(1, missed.sum())), 4),
    }


def _ratios(without: Mapping[str, Any], with_: Mapping[str, Any]) -> dict[str, float | None]:
    """with / without for the latency metrics and attainment (below 1 is better for latencies)."""
    pairs = {
        "ttft_p50": (with_["ttft_s"]["p50"], without["ttft_s"]["p50"]),
        "ttft_p99": (with_["ttft_s"]["p99"], without["ttft_s"]["p99"]),
        "tpot_p50": (with_["tpot_s"]["p50"], without["tpot_s"]["p50"]),
        "tpot_p99": (with_["tpot_s"]["p99"], without["tpot_s"]["p99"]),
        "slo_attainment": (with_["slo_attainment"], without["slo_attainment"]),
    }
    return {k: round(a / b, 4) if a is not None and b else None for k, (a, b) in pairs.items()}


def _file_digest(*modules: Any) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    global _TRACE
    args = parse_args(argv)
    t_start = time.perf_counter()
    command = "python -m bench.rebalance " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo_s = args.slo_ttft_ms / 1000.0
    scales = sorted({float(s) for s in args.rates.split(",") if s.strip()})
    rebalancer = RebalancerConfig.model_validate({**json.loads(args.rebalancer), "enabled": True})
    migration = MigrationConfig.model_validate(json.loads(args.migration))
    policy = args.policy
    provenance = bench_provenance.provenance([policy])
    probe = SimInstance.from_config(engine_config(args.profile, args.compute_derate))
    link = load_profile(args.profile).kv_transfer.model_copy(update=json.loads(args.kv_transfer))
    link = KvTransferProfile.model_validate(link.model_dump())  # validate the overrides
    trace, dropped = _load(args, probe.max_model_len)
    _TRACE = trace
    params = _params_for(policy, {}, args.slo_ttft_ms)
    base_cfg = ReplayConfig(
        num_instances=args.instances,
        scale=1.0,
        profile=args.profile,
        compute_derate=args.compute_derate,
        load_report_interval_s=args.load_report_interval_ms / 1000.0,
        policy_params=params,
        seed=args.seed,
        migration=migration,
        kv_transfer=link,
    )
    tasks = [
        (policy, dataclasses.replace(base_cfg, scale=s), r)
        for s in reversed(scales)
        for r in (None, rebalancer)
    ]
    print(f"{len(trace.requests)} requests, {trace.rate:.3f} req/s; {len(tasks)} runs", file=sys.stderr)
    results: dict[tuple[float, bool], RunResult] = {}
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for task, res in zip(tasks, pool.imap(_run_task, tasks), strict=True):
            results[(task[1].scale, task[2] is not None)] = res
            r = res.replay
            print(
                f"x{r.scale:g} {'with' if task[2] else 'without'} rebalancer: attainment "
                f"{metrics.slo_attainment(r.ttft_s, slo_s):.3f}, {len(res.outcomes)} migrations tried "
                f"({r.cpu_s:.0f} s cpu)",
                file=sys.stderr,
                flush=True,
            )
    profile = load_profile(args.profile).model_copy(update={"kv_transfer": link})
    transfer = KvTransferCost.from_profile(profile, block_size=probe.block_size)
    doc: dict[str, Any] = {
        **_describe(args, trace, dropped, probe),
        "policy": policy,
        "policy_params": params,
        "rebalancer": rebalancer.model_dump(),
        "migration": migration.model_dump(),
        "kv_transfer": {
            **dataclasses.asdict(transfer),
            "link": link.link,
            "transfer_s_of_128_blocks": transfer.transfer_s(128),
        },
        "runs": [],
    }
    for s in scales:
        without, with_ = results[(s, False)], results[(s, True)]
        rows = {}
        for key, res in (("without", without), ("with", with_)):
            rows[key] = {
                **metrics.summarize(res.replay, slo_s, trace.rate),
                "tpot_quantiles_s": res.tpot_quantiles_s,
            }
        rows["with"]["rebalancing"] = _migration_stats(with_, transfer.bytes_per_block)
        rows["without"]["slo_misses_by_burst"] = _misses_by_burst(without.replay, trace, slo_s)
        doc["runs"].append(
            {"scale": s, **rows, "ratio_with_over_without": _ratios(rows["without"], rows["with"])}
        )
    wall_s = time.perf_counter() - t_start
    doc["invocation"] = {
        "command": command,
        "provenance": {
            **{k: v for k, v in provenance.items() if k != "policy_sources"},
            "policy_source": provenance["policy_sources"][policy],
            "rebalancer_sha256_16": _file_digest(rebalancer_module),
        },
        "python": platform.python_version(),
        "wall_s": wall_s,
        "jobs": args.jobs,
        "sum_of_run_cpu_s": sum(r.replay.cpu_s for r in results.values()),
        "load_average_at_end": list(os.getloadavg()),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(render_summary(doc), encoding="utf-8")
    title = f"{Path(args.trace).name}, {args.instances} x {args.profile}, {policy}"
    plots.plot_latency_cdfs(
        {
            r["scale"]: {
                "without rebalancer": (r["without"]["ttft_quantiles_s"], r["without"]["tpot_quantiles_s"]),
                "with rebalancer": (r["with"]["ttft_quantiles_s"], r["with"]["tpot_quantiles_s"]),
            }
            for r in doc["runs"]
        },
        slo_s=slo_s,
        title=title,
        path=out / "latency_cdf.png",
    )
    print(f"wrote {out}/ in {wall_s:.0f} s", file=sys.stderr)
    return 0


def render_summary(doc: Mapping[str, Any]) -> str:
    """The with/without table per scale and what the rebalancer did (the README quotes it)."""
    tr, reb, mig = doc["trace"], doc["rebalancer"], doc["migration"]
    inv = doc["invocation"]
    lines = [
        f"# Rebalancing: {Path(tr['path']).name} on {doc['instances']} x {doc['profile']['name']}, "
        f"{doc['policy']}",
        "",
        f"Command: `{inv['command']}` ({inv['wall_s']:.0f} s wall, "
        f"{inv['sum_of_run_cpu_s']:.0f} s CPU summed).",
        "",
        f"Rebalancer: period {reb['period_s']:g} s, at most {reb['max_moves_per_period']} moves per period, "
        f"overloaded at waiting >= {reb['max_waiting']} or queue >= {reb['imbalance_ratio']:g} x mean and "
        f">= mean + {reb['min_load_gap']}, cooldown {reb['request_cooldown_s']:g} s. Migration: "
        f"{mig['max_stages']} pre-copy stages at most, last stage <= {mig['last_stage_max_blocks']} blocks, "
        f"admission margin {mig['admission_margin_blocks']} blocks. KV link: {doc['kv_transfer']['link']}, "
        f"{doc['kv_transfer']['bytes_per_block'] / 2**20:g} MiB per block, 128 blocks in "
        f"{1000 * doc['kv_transfer']['transfer_s_of_128_blocks']:.1f} ms.",
        "",
        "| scale | req/s | rebalancer | SLO met | TTFT p50 | TTFT p99 | TPOT p50 (ms) | TPOT p99 (ms) "
        "| migrations (no KV) | downtime total / p99 | bytes moved |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in doc["runs"]:
        for key in ("without", "with"):
            r = run[key]
            st = r.get("rebalancing")
            moves = f"{st['migrations']} ({st['moved_without_kv']})" if st else "—"
            p99 = (st or {}).get("downtime_s", {}).get("p99")
            down = f"{st['downtime_total_s']:.2f} s / {1000 * p99:.0f} ms" if st and p99 is not None else "—"
            moved = f"{st['bytes_moved'] / 2**30:.2f} GiB" if st else "—"
            lines.append(
                f"| {run['scale']:g} | {r['rate_req_s']:.1f} | {key} | {100 * r['slo_attainment']:.1f} % "
                f"| {r['ttft_s']['p50']:.3f} s | {r['ttft_s']['p99']:.3f} s "
                f"| {1000 * r['tpot_s']['p50']:.1f} | {1000 * r['tpot_s']['p99']:.1f} "
                f"| {moves} | {down} | {moved} |"
            )
    lines += [
        "",
        "| scale | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | SLO attainment |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in doc["runs"]:
        q = run["ratio_with_over_without"]
        lines.append(
            f"| {run['scale']:g} | {q['ttft_p50']} | {q['ttft_p99']} | {q['tpot_p50']} | {q['tpot_p99']} "
            f"| {q['slo_attainment']} |"
        )
    lines += ["", "Ratios are with / without rebalancing (below 1 is better for latencies).", ""]
    for run in doc["runs"]:
        st = run["with"]["rebalancing"]
        lines.append(
            f"- x{run['scale']:g}: {st['passes']} passes ({st['passes_with_overload']} with an overloaded "
            f"instance, {st['passes_with_overload_but_no_destination']} of them with no instance able to "
            f"take work) planned {st['planned_moves']} moves ({st['planned_before_first_token']} of them of "
            f"requests without a first token; {st['planned_by_reason']}); outcomes {st['outcomes']}; "
            f"not moved: {st['not_moved_reasons']}; pre-copy stages {st['stages']}."
        )
    for run in doc["runs"]:
        b = run["without"]["slo_misses_by_burst"]
        top = ", ".join(
            f"{w['start_s']:g} s ({w['arrivals']} arrivals, {w['misses']} misses)" for w in b["top_windows"]
        )
        lines.append(
            f"- x{run['scale']:g} without rebalancing: {b['misses']} SLO misses, "
            f"{100 * b['fraction_of_misses_in_top_windows']:.1f} % of them in three {b['window_s']:g}-s "
            f"windows starting at {top}; the mean window has {b['mean_arrivals_per_window']} arrivals."
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
