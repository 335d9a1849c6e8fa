"""The routing benchmark over the whole workload family, at 8 and 32 instances, with the oracle.

One routing benchmark on one trace says little: a policy tuned on the committed Mooncake
synthetic trace can collapse on traffic with a long system prompt. This driver runs
``bench.routing`` (every registered policy plus ``oracle``) on each workload of
``bench/workloads.py`` built from the shared traces, at both fleet sizes, and summarises
every policy's capacity (the interpolated rate scale where 90 % of requests meet the 2 s TTFT
SLO) against the best baseline and against the oracle:

    python -m bench.family --out bench/results/family            # everything (hours on 2 cores)
    python -m bench.family --out bench/results/family --only head-2k --sizes 8
    python -m bench.family --out bench/results/family --summarize  # tables from existing runs

Writes ``<workload>-<n>/`` (``bench.routing``'s own results, PNGs and summary) per run, and
``summary.json``, ``summary.md`` and ``capacity_vs_oracle.png`` over all of them. Rate grids
are per workload (8 instances; x4 at 32), chosen to bracket every policy's crossing; a policy
that fails the target at the lowest rate has no capacity on the grid and is reported as such.

``--routers R`` runs the multi-router study instead: the ``mooncake`` and ``sessions``
workloads at 8 instances with 1, 2, 4 and 8 router replicas, each replica seeing a random share
of the requests and keeping only its own view (``bench/replay.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import routing

__all__ = ["WORKLOADS", "Workload", "main", "summarize", "summarize_routers"]

_TRACES = "../shared/traces"
_MOONCAKE: tuple[str, ...] = ("--trace", f"{_TRACES}/mooncake_synthetic_trace.jsonl", "--format", "mooncake")
_MOONCAKE += ("--limit", "2000")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    args: tuple[str, ...]
    rates: tuple[float, ...]
    """Rate scales at 8 instances (x4 at 32)."""
    prefix_heavy: bool
    """Whether prefix reuse decides capacity here (where affinity routing must win by 1.25x)."""
    what: str


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "mooncake", _MOONCAKE, (1, 1.5, 2, 2.5, 3, 3.5, 4, 5), True, "Mooncake synthetic (first 2,000)",
    ),
    Workload(
        "head-512", (*_MOONCAKE, "--shared-head-tokens", "512"), (1, 1.5, 2, 2.5, 3, 3.5, 4, 5), True,
        "Mooncake + one 512-token head on every request",
    ),
    Workload(
        "head-2k", (*_MOONCAKE, "--shared-head-tokens", "2048"), (1, 1.5, 2, 2.5, 3, 3.5, 4, 5), True,
        "Mooncake + one 2,048-token head on every request",
    ),
    Workload(
        "head-8k", (*_MOONCAKE, "--shared-head-tokens", "8192"), (0.75, 1, 1.5, 2, 2.5, 3, 3.5), True,
        "Mooncake + one 8,192-token head on every request",
    ),
    Workload(
        "zipf-heads", (*_MOONCAKE, "--heads", "50", "--head-tokens", "2048", "--head-zipf", "1.0"),
        (1, 1.5, 2, 2.5, 3, 3.5, 4, 5), True, "Mooncake + one of 50 2,048-token heads, Zipf(1) popularity",
    ),
    Workload(
        "sessions",
        (
            "--trace", f"{_TRACES}/azure_llm_2023_code.csv", "--format", "azure", "--limit", "2500",
            "--sessions", "--shared-head-tokens", "2048",
        ),
        (5, 10, 15, 20, 25, 30, 35), True,
        "Azure code lengths as multi-turn sessions (mean 3 turns, 60 s think) behind a 2,048-token head",
    ),
    Workload(
        "arxiv-slice", ("--trace", f"{_TRACES}/mooncake_arxiv_trace_slice.jsonl", "--format", "mooncake"),
        (1, 2, 3, 4, 5, 6, 7), True, "Mooncake arXiv slice (real Kimi traffic, long shared heads)",
    ),
    Workload(
        "azure-code",
        ("--trace", f"{_TRACES}/azure_llm_2023_code.csv", "--format", "azure", "--limit", "3000"),
        (10, 15, 20, 22.5, 25, 27.5, 30), False, "Azure code (no prefix identity)",
    ),
    Workload(
        "servegen",
        (
            "--trace", f"{_TRACES}/servegen_language_m-large_chunk-0-trace.csv", "--format", "servegen",
            "--servegen-dataset", f"{_TRACES}/servegen_language_m-large_chunk-0-dataset.json",
            "--limit", "3000",
        ),
        (1000, 2000, 3000, 4000, 6000, 8000, 12000), False, "ServeGen language client (no prefix identity)",
    ),
)  # fmt: skip
_BY_NAME = {w.name: w for w in WORKLOADS}
_BASELINES_EXCLUDE = ("dualmap", "oracle")
_ROUTER_COUNTS = (1, 2, 4, 8)
_ROUTER_POLICIES = "consistent_hash,dualmap,least_load,prefix_tree"
_ROUTER_REFERENCE_SCALE = {"mooncake": 3.0, "sessions": 25.0}
"""Where the multi-router table reads hit rate and agreement: a load every policy but
``consistent_hash`` carries at one router, on both the family's and the study's rate grids."""


def _rates(w: Workload, n: int, rates: Sequence[float] | None = None) -> str:
    factor = n / 8
    return ",".join(f"{r * factor:g}" for r in (rates or w.rates))


def run(
    w: Workload,
    n: int,
    out: Path,
    jobs: int,
    *,
    routers: int = 1,
    policies: str = "all",
    rates: Sequence[float] | None = None,
) -> Path:
    """One ``bench.routing`` run of ``w`` at ``n`` instances (``rates``: the grid at 8 instances,
    instead of the workload's own)."""
    target = out / (f"{w.name}-{n}" if routers == 1 else f"{w.name}-{n}-routers{routers}")
    argv = [*w.args, "--instances", str(n), "--rates", _rates(w, n, rates), "--policies", policies]
    argv += ["--out", str(target), "--jobs", str(jobs), "--routers", str(routers)]
    print(
        f"== {w.name} at {n} instances, {routers} router(s): python -m bench.routing {' '.join(argv)}",
        file=sys.stderr,
    )
    routing.main(argv)
    return target


def _capacity(entry: dict[str, Any]) -> float | None:
    cap = entry.get("capacity_scale_interp")
    return float(cap) if cap is not None else None


def _saturated(entry: dict[str, Any]) -> bool:
    """Still over the target at the highest rate run: the capacity is at least the grid's top."""
    return bool(entry.get("capacity_saturated"))


def _row(w: Workload, n: int, doc: dict[str, Any]) -> dict[str, Any]:
    pols = doc["policies"]
    caps = {p: _capacity(e) for p, e in pols.items()}
    baselines = {p: c for p, c in caps.items() if p not in _BASELINES_EXCLUDE and c is not None}
    best_name = max(baselines, key=lambda p: baselines[p]) if baselines else None
    best = baselines.get(best_name) if best_name else None
    dm, oracle = caps.get("dualmap"), caps.get("oracle")
    scales = sorted({r["scale"] for e in pols.values() for r in e["runs"]})
    step = min((b - a for a, b in itertools.pairwise(scales)), default=0.0)
    dm_runs = {r["scale"]: r for r in pols.get("dualmap", {}).get("runs", [])}
    at = doc.get("cdf_scale")
    outcomes = dm_runs[at]["decision_outcomes"] if at in dm_runs else {}
    return {
        "workload": w.name,
        "instances": n,
        "what": w.what,
        "prefix_heavy": w.prefix_heavy,
        "capacity_scale": caps,
        "capacity_at_grid_top": sorted(p for p, e in pols.items() if _saturated(e)),
        "best_baseline": best_name,
        "dualmap_over_best_baseline": dm / best if dm and best else None,
        "dualmap_over_oracle": dm / oracle if dm and oracle else None,
        "within_one_rate_step_of_best": (dm is not None and best is not None and dm >= best - step),
        "rate_step": step,
        "prefix_hit_rate_at_cdf_scale": {
            p: next((r["prefix_hit_rate"] for r in e["runs"] if r["scale"] == at), None)
            for p, e in pols.items()
        },
        "dualmap_outcomes_at_cdf_scale": outcomes,
        "cdf_scale": at,
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def summarize(out: Path) -> dict[str, Any]:
    """Rows for every ``<workload>-<n>/results.json`` under ``out``; writes summary.{json,md,png}."""
    rows = []
    for w in WORKLOADS:
        for n in (8, 32):
            path = out / f"{w.name}-{n}" / "results.json"
            if path.exists():
                rows.append(_row(w, n, json.loads(path.read_text(encoding="utf-8"))))
    doc = {"target": "capacity = rate scale where 90 % of requests meet the 2 s TTFT SLO", "rows": rows}
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    policies = sorted({p for r in rows for p in r["capacity_scale"]})
    lines = [
        "# Routing benchmark over the workload family",
        "",
        "Capacity: the interpolated rate scale at which 90 % of requests meet the 2 s TTFT SLO",
        "(simulated H100s, llama3.1-8b profile). `—`: the target is not met even at the lowest rate;",
        "`≥`: still met at the highest rate run (the capacity is at least that).",
        "",
        "| workload | n | " + " | ".join(policies) + " | best baseline | DualMap / best | DualMap / oracle |",
        "|---|---|" + "---|" * len(policies) + "---|---|---|",
    ]
    for r in rows:
        top = set(r.get("capacity_at_grid_top", ()))
        caps = " | ".join(("≥" if p in top else "") + _fmt(r["capacity_scale"].get(p)) for p in policies)
        lines.append(
            f"| {r['workload']} | {r['instances']} | {caps} | {r['best_baseline'] or '—'} | "
            f"{_fmt(r['dualmap_over_best_baseline'])} | {_fmt(r['dualmap_over_oracle'])} |"
        )
    lines += ["", "DualMap's decisions at each run's CDF scale (affinity = a ring candidate won):", ""]
    for r in rows:
        lines.append(
            f"- {r['workload']}-{r['instances']} (x{r['cdf_scale']}): {r['dualmap_outcomes_at_cdf_scale']}"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, out / "capacity_vs_oracle.png")
    return doc


def summarize_routers(out: Path) -> dict[str, Any]:
    """The multi-router table from ``<w>-8/`` (one router) and ``<w>-8-routers<R>/``: per policy
    and replica count, capacity, hit rate and how often all replicas agree, at the reference scale."""
    rows = []
    for name, at in _ROUTER_REFERENCE_SCALE.items():
        for r in _ROUTER_COUNTS:
            path = out / (f"{name}-8" if r == 1 else f"{name}-8-routers{r}") / "results.json"
            if not path.exists():
                continue
            pols = json.loads(path.read_text(encoding="utf-8"))["policies"]
            for policy in _ROUTER_POLICIES.split(","):
                entry = pols.get(policy)
                if entry is None:
                    continue
                run_at = next((x for x in entry["runs"] if x["scale"] == at), None)
                agreement = (run_at or {}).get("replica_agreement") or {}
                rows.append(
                    {
                        "workload": name,
                        "routers": r,
                        "policy": policy,
                        "capacity_scale": _capacity(entry),
                        "at_grid_top": _saturated(entry),
                        "reference_scale": at,
                        "prefix_hit_rate": run_at["prefix_hit_rate"] if run_at else None,
                        "slo_attainment": run_at["slo_attainment"] if run_at else None,
                        "agree_instance": agreement.get("instance"),
                        "agree_candidates": agreement.get("candidates"),
                    }
                )
    doc = {"rows": rows}
    (out / "routers.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# Many routers: each replica sees a random share of the requests and only its own view",
        "",
        "Capacity as in `summary.md`; hit rate, SLO attainment and agreement (share of sampled",
        "requests on which every replica would choose the same instance / the same candidates) at the",
        "reference scale.",
        "",
        "| workload | routers | policy | capacity | hit rate | SLO met | agree: instance "
        "| agree: candidates |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        cap = ("≥" if x["at_grid_top"] else "") + _fmt(x["capacity_scale"])
        pct = [_pct(x["prefix_hit_rate"], 1), _pct(x["slo_attainment"], 1)]
        agree = [_pct(x["agree_instance"], 0), _pct(x["agree_candidates"], 0)]
        lines.append(
            f"| {x['workload']} (x{x['reference_scale']:g}) | {x['routers']} | {x['policy']} | {cap} | "
            f"{pct[0]} | {pct[1]} | {agree[0]} | {agree[1]} |"
        )
    (out / "routers.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return doc


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({p for r in rows for p in r["capacity_scale"] if p != "oracle"})
    labels = [f"{r['workload']}\n{r['instances']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.8 / len(policies)
    for k, p in enumerate(policies):
        vals = []
        for r in rows:
            c, o = r["capacity_scale"].get(p), r["capacity_scale"].get("oracle")
            vals.append(100 * c / o if c and o else 0.0)
        ax.bar([i + k * width for i in range(len(rows))], vals, width, label=p)
    ax.axhline(90, color="red", lw=0.8, label="90 % of the oracle")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("capacity, % of the oracle's")
    ax.set_title("Capacity at the 2 s TTFT SLO (90 % attainment), relative to the perfect-information oracle")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.family", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", default=None, help="comma list of workloads (default: all)")
    p.add_argument("--sizes", default="8,32")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summarize", action="store_true", help="only rebuild the summary from existing runs")
    p.add_argument("--routers", action="store_true", help="the multi-router study instead (see above)")
    p.add_argument("--router-counts", default=",".join(map(str, _ROUTER_COUNTS)), help="with --routers")
    p.add_argument("--rates", default=None, help="comma list: the rate grid at 8 instances for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else [w.name for w in WORKLOADS]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {', '.join(_BY_NAME)}")
    rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    if args.routers:
        for name in ("mooncake", "sessions") if not args.only else names:
            for r in (int(c) for c in args.router_counts.split(",")):
                run(_BY_NAME[name], 8, out, args.jobs, routers=r, policies=_ROUTER_POLICIES, rates=rates)
        summarize_routers(out)
        return 0
    if not args.summarize:
        for n in (int(s) for s in args.sizes.split(",")):
            for name in names:
                run(_BY_NAME[name], n, out, args.jobs, rates=rates)
    summarize(out)
    summarize_routers(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
