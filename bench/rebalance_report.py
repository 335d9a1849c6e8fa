"""Numbers and tables of the rebalancing benchmark (``bench.rebalance``), from raw run outcomes.

Kept apart from the replay driver so the definitions ``summary.md`` and the README quote
(what counts as a migration, where SLO misses cluster, the with/without ratios) live in one
place that reads only data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import metrics
from bench.replay import ReplayResult
from bench.traces import Trace
from switchyard.router.rebalancer import Move
from switchyard.workers.sim.migration import SimMigrationOutcome

__all__ = ["RunResult", "migration_stats", "misses_by_burst", "ratios", "render_summary", "tpot_quantiles"]


@dataclass(slots=True)
class RunResult:
    """One replay plus what its rebalancer did (empty without one)."""

    replay: ReplayResult
    tpot_quantiles_s: list[float]
    diagnosis: dict[str, int] = field(default_factory=dict)
    planned: list[Move] = field(default_factory=list)
    outcomes: list[SimMigrationOutcome] = field(default_factory=list)


def tpot_quantiles(res: ReplayResult) -> list[float]:
    tpot = res.tpot_s[~np.isnan(res.tpot_s)]
    return [round(float(v), 6) for v in np.percentile(tpot, metrics.CDF_QUANTILES)] if tpot.size else []


def migration_stats(run: RunResult, bytes_per_block: int) -> dict[str, Any]:
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


def misses_by_burst(res: ReplayResult, trace: Trace, slo_s: float, window_s: float = 5.0) -> dict[str, Any]:
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


def ratios(without: Mapping[str, Any], with_: Mapping[str, Any]) -> dict[str, float | None]:
    """with / without for the latency metrics and attainment (below 1 is better for latencies)."""
    pairs = {
        "ttft_p50": (with_["ttft_s"]["p50"], without["ttft_s"]["p50"]),
        "ttft_p99": (with_["ttft_s"]["p99"], without["ttft_s"]["p99"]),
        "tpot_p50": (with_["tpot_s"]["p50"], without["tpot_s"]["p50"]),
        "tpot_p99": (with_["tpot_s"]["p99"], without["tpot_s"]["p99"]),
        "slo_attainment": (with_["slo_attainment"], without["slo_attainment"]),
    }
    return {k: round(a / b, 4) if a is not None and b else None for k, (a, b) in pairs.items()}


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
