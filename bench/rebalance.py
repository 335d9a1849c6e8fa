"""Rebalancing benchmark: DualMap with and without the router's hotspot rebalancer, same trace.

Issue #4 asks whether live migration off hotspots improves P99 TTFT and P99 TPOT over DualMap
routing alone on a bursty trace. Routing can only place *new* requests; the rebalancer moves
requests already queued or running. Each rate scale is replayed twice in virtual time on the
same simulated fleet (``bench/replay.py``, the real policy and registry): once with routing
alone, once with the router's own ``Rebalancer`` taking its step (``plan`` over the router's
view, ``attempting`` for each move's cool-down) every ``period_s`` on the virtual clock, its
moves applied one after another by ``SimFleet.migrate``, which stages and prices them like the
real protocol (``workers/sim/migration.py``). ``--policy`` swaps the router (a hotspot-prone
one shows what the mechanism can do where there is a hotspot to relieve).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import metrics, plots
from bench import provenance as bench_provenance
from bench.rebalance_report import (
    RunResult,
    migration_stats,
    misses_by_burst,
    ratios,
    render_summary,
    tpot_quantiles,
)
from bench.replay import ReplayConfig, ReplayResult, _Replay, engine_config
from bench.routing import _describe, _load
from bench.traces import Trace
from switchyard.config import MigrationConfig, RebalancerConfig
from switchyard.router import rebalancer as rebalancer_module
from switchyard.router.policies import POLICIES, policy_params
from switchyard.router.rebalancer import InstanceLoad, Move, Rebalancer, StreamView, pressure
from switchyard.workers.sim.cost import KvTransferCost, KvTransferProfile, available_profiles, load_profile
from switchyard.workers.sim.instance import SimInstance
from switchyard.workers.sim.migration import SimMigrationOutcome

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


class _RebalancingReplay(_Replay):
    """``_Replay`` with the router's rebalancer on the same virtual timeline.

    As ``Rebalancer.run`` does: every ``period_s`` after the previous pass ended, the real
    ``Rebalancer`` plans over this router view (the registry and one ``StreamView`` per running
    request), and the planned moves migrate one at a time. Registry and policy accounting stay
    with the dispatch instance, as ``RouterCore`` keeps them after a move.
    """

    def __init__(self, trace: Trace, policy: str, cfg: ReplayConfig, rebalancer: RebalancerConfig) -> None:
        super().__init__(trace, policy, cfg)
        self.rebalancer = rebalancer
        self.step = Rebalancer(self, rebalancer, clock=self.fleet.clock)
        self.moved_to: dict[int, str] = {}  # request index -> where a migration put it
        self.diagnosis: Counter[str] = Counter()
        self.planned: list[Move] = []
        self.migrations: list[SimMigrationOutcome] = []

    def run(self) -> ReplayResult:
        self.fleet.call_at(self.rebalancer.period_s, self._pass)
        return super().run()

    @property
    def streams(self) -> dict[str, StreamView]:
        """The router view's streams (``RouterView``): what ``MovableStream`` would report."""
        views: dict[str, StreamView] = {}
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
        plan = self.step.plan()
        loads = self.step.last_loads
        tokens = {r.request_id: r.num_tokens for ld in loads for r in ld.requests}
        self._diagnose(loads)
        self.diagnosis["planned_before_first_token"] += sum(1 for m in plan if tokens[m.request_id] == 0)
        self.planned.extend(plan)
        self._apply(plan, 0)

    def _diagnose(self, loads: Sequence[InstanceLoad]) -> None:
        """Count passes with an overloaded instance, and those where no instance could take work
        (by the planner's own definitions, ``rebalancer.pressure``)."""
        p = pressure(loads, self.rebalancer)
        self.diagnosis["passes"] += 1
        self.diagnosis["instances_waiting_sum"] += sum(ld.num_waiting > 0 for ld in loads)
        if p.overloaded:
            self.diagnosis["passes_with_overload"] += 1
            if not p.receivers:
                self.diagnosis["passes_with_overload_but_no_destination"] += 1

    def _apply(self, plan: Sequence[Move], i: int) -> None:
        if i == len(plan):
            self.fleet.call_at(self.fleet.now + self.rebalancer.period_s, self._pass)
            return
        move = plan[i]
        self.step.attempting(move)

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
        return RunResult(res, tpot_quantiles(res))
    rrep = _RebalancingReplay(_TRACE, policy, cfg, rebalancer)
    res = rrep.run()
    return RunResult(res, tpot_quantiles(res), dict(rrep.diagnosis), rrep.planned, rrep.migrations)


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
    params = policy_params(policy, {}, ttft_slo_ms=args.slo_ttft_ms)
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
        rows["with"]["rebalancing"] = migration_stats(with_, transfer.bytes_per_block)
        rows["without"]["slo_misses_by_burst"] = misses_by_burst(without.replay, trace, slo_s)
        doc["runs"].append(
            {"scale": s, **rows, "ratio_with_over_without": ratios(rows["without"], rows["with"])}
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


if __name__ == "__main__":
    raise SystemExit(main())
