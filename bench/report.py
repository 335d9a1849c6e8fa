"""Markdown tables from a routing-benchmark ``results.json`` document.

The README quotes these tables; generating them from the JSON (instead of copying numbers by
hand) keeps the two from drifting apart. ``python -m bench.report DIR...`` re-renders
``summary.md`` of existing result directories; with ``--overview`` it prints one compact table
per directory instead (capacity plus every metric at one common scale), for the README.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_overview", "render_summary"]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _cap(p: Mapping[str, Any], base_rate: float) -> tuple[str, str, str]:
    scale = p["capacity_scale"]
    if scale is None:
        return "< lowest", "—", "—"
    ge = "≥ " if p["capacity_saturated"] else ""
    return f"{ge}{scale:g}", f"{ge}{scale * base_rate:.2f}", f"{p['capacity_scale_interp']:.2f}"


def render_summary(doc: Mapping[str, Any]) -> str:
    """The capacity table and the per-scale table of one results document."""
    tr, prof, slo = doc["trace"], doc["profile"], doc["slo"]
    bound = doc["prefix_hit_bound"]["token_hit_rate"]
    base = tr["base_rate_req_s"]
    feasible = doc["slo_feasible_fraction"]
    lines = [
        f"# {Path(tr['path']).name} on {doc['instances']} x {prof['name']}: "
        f"TTFT SLO {slo['ttft_s']:g} s for {100 * slo['target_attainment']:.0f} % of requests",
        "",
        "Commands (later ones replaced the runs of the policies they name):",
        "",
        *(f"- `{inv['command']}` ({inv['wall_s']:.0f} s wall)" for inv in doc["invocations"]),
        "",
        f"Trace: {tr['requests']} requests ({tr['dropped_over_context']} dropped: prompt + output over "
        f"{prof['max_model_len']} tokens), base rate {base:.3f} req/s, "
        f"mean input {tr['input_tokens_mean']:.0f} / output {tr['output_tokens_mean']:.0f} tokens. "
        f"Profile `{prof['id']}` (derate "
        f"{prof['compute_derate']:g}), {prof['kv_cache_tokens_per_instance']} KV tokens per instance, "
        f"load reports every {1000 * doc['load_report_interval_s']:g} ms.",
        "",
        f"Best reachable prefix-hit rate (one infinite cache, longest prefix): **{_pct(bound)}** of prompt "
        f"tokens ({_pct(doc['prefix_hit_bound']['block_hit_rate'])} of 512-token blocks). One LRU cache "
        f"as large as the whole fleet's KV would catch {_pct(doc['lru_fleet_kv_reference_hit_rate'])}.",
        "",
        f"Attainment ceiling: alone on an idle instance, {_pct(feasible['cold_cache'])} of requests meet "
        f"the SLO with a cold cache, {_pct(feasible['best_cache'])} with the best "
        "reachable prefix hits; the rest miss it under any router.",
        "",
        "| policy | capacity (rate scale) | capacity (req/s) | crossing (interpolated scale) |",
        "|---|---:|---:|---:|",
    ]
    for name, p in doc["policies"].items():
        scale, rate, interp = _cap(p, base)
        lines.append(f"| {name} | {scale} | {rate} | {interp} |")
    lines += [
        "",
        "| policy | scale | req/s | SLO met | TTFT p50 | TTFT p99 | TPOT p50 (ms) | TPOT p99 (ms) "
        "| hit rate | of bound | busy max/mean | preempt. | outcomes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, p in doc["policies"].items():
        for r in p["runs"]:
            hit = r["prefix_hit_rate"]
            of_bound = _pct(hit / bound) if bound > 0 and hit is not None else "—"
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["decision_outcomes"].items()))
            lines.append(
                f"| {name} | {r['scale']:g} | {r['rate_req_s']:.2f} | {_pct(r['slo_attainment'])} "
                f"| {_s(r['ttft_s']['p50'])} | {_s(r['ttft_s']['p99'])} | {_ms(r['tpot_s']['p50'])} "
                f"| {_ms(r['tpot_s']['p99'])} | {_pct(hit)} | {of_bound} "
                f"| {r['imbalance_busy_max_over_mean']:.2f} | {r['preemptions']} | {outcomes} |"
            )
    lines.append("")
    for inv in doc["invocations"]:
        lines.append(
            f"Runtime of `{' '.join(inv['policies'])}`: {inv['wall_s']:.0f} s wall for {inv['runs']} runs "
            f"with {inv['jobs']} process(es) ({inv['sum_of_run_wall_s']:.0f} s wall, "
            f"{inv.get('sum_of_run_cpu_s', float('nan')):.0f} s CPU summed over runs)."
        )
    lines.append("")
    return "\n".join(lines)


def render_overview(doc: Mapping[str, Any], scale: float | None = None) -> str:
    """One row per policy: capacity, then the metrics of its run at ``scale`` (default: the CDF scale)."""
    at = doc["cdf_scale"] if scale is None else scale
    base = doc["trace"]["base_rate_req_s"]
    bound = doc["prefix_hit_bound"]["token_hit_rate"]
    lines = [
        f"| policy | capacity: scale (req/s) | at x{at:g} ({at * base:.1f} req/s): SLO met "
        "| TTFT p50 | TTFT p99 | TPOT p50 / p99 (ms) | prefix hits (of bound) | busy max/mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in doc["policies"].items():
        scale_s, rate_s, _ = _cap(p, base)
        cap = f"{scale_s} ({rate_s})"
        run = next((r for r in p["runs"] if r["scale"] == at), None)
        if run is None:
            lines.append(f"| {name} | {cap} | not run | | | | | |")
            continue
        hit = run["prefix_hit_rate"]
        of_bound = f" ({_pct(hit / bound)})" if bound > 0 else ""
        lines.append(
            f"| {name} | {cap} | {_pct(run['slo_attainment'])} | {_s(run['ttft_s']['p50'])} "
            f"| {_s(run['ttft_s']['p99'])} | {_ms(run['tpot_s']['p50'])} / {_ms(run['tpot_s']['p99'])} "
            f"| {_pct(hit)}{of_bound} | {run['imbalance_busy_max_over_mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    overview = "--overview" in args
    for d in (a for a in args if a != "--overview"):
        doc = json.loads((Path(d) / "results.json").read_text(encoding="utf-8"))
        if overview:
            print(f"{d}\n\n{render_overview(doc)}")
        else:
            (Path(d) / "summary.md").write_text(render_summary(doc), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
