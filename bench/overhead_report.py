"""``summary.md`` and ``router_overhead.png`` from a router-overhead ``results.json``.

Generated, not hand-written, so the tables always match the JSON next to them; what the
numbers mean is argued in ``bench/README.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.overhead_decisions import DECISION_P99_TARGET_US, N_INSTANCES, PROMPT_TOKENS
from bench.overhead_e2e import ADDED_P99_TARGET_MS, PATHS

_LABEL = {
    "direct_worker_grpc": "direct: `WorkerClient.generate` (gRPC)",
    "router_core_inprocess": "router core in-process: `RouterCore.generate`",
    "gateway_http": "gateway: HTTP `/v1/completions`",
}


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _decision_table(dec: dict[str, Any]) -> list[str]:
    reps = dec["baseline_trivial"]["reps"]
    rows = [
        "| policy | decisions/s (CPU, 1 core) | P50 µs wall | P99 µs wall | P99 per repetition | P50 µs CPU"
        " | P99 µs CPU | P50 vs trivial | P99 < 100 µs? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = dec["baseline_trivial"]
    rows.append(
        f"| *trivial* | {_f(base['decisions_per_s_cpu'], 0)} | {_f(base['wall']['p50_us'])} | "
        f"{_f(base['wall']['p99_us'])} | {', '.join(_f(v, 1) for v in base['wall']['p99_us_per_rep'])} | "
        f"{_f(base['cpu']['p50_us'])} | {_f(base['cpu']['p99_us'])} | 1.0x | — |"
    )
    for name, r in dec["policies"].items():
        met = "yes" if r["p99_target_met_wall"] else "**no**"
        wall, cpu = r["wall"], r["cpu"]
        rows.append(
            f"| {name} | {_f(r['decisions_per_s_cpu'], 0)} | {_f(wall['p50_us'])} | {_f(wall['p99_us'])} | "
            f"{', '.join(_f(v, 1) for v in wall['p99_us_per_rep'])} | {_f(cpu['p50_us'])} | "
            f"{_f(cpu['p99_us'])} | {_f(r['ratio_p50_wall_vs_trivial'], 1)}x | {met} |"
        )
    ctrl = dec.get("control_fixed_work")
    if ctrl is not None:
        cw, cc = ctrl["wall"], ctrl["cpu"]
        rows.append(
            f"| *fixed CPU work (control)* | — | {_f(cw['p50_us'])} | {_f(cw['p99_us'])} | "
            f"{', '.join(_f(v, 1) for v in cw['p99_us_per_rep'])} | {_f(cc['p50_us'])} | "
            f"{_f(cc['p99_us'])} | — | — |"
        )
    per_rep = base["decisions_per_rep"]
    return [f"Median over {reps} repetitions of {per_rep:,} timed decisions each.", "", *rows]


def _e2e_table(by_path: dict[str, Any], cpu_key: str | None) -> list[str]:
    head = "| path | P50 ms | P99 ms | added P50 ms | added P99 ms | P50 ratio | P99 ratio | errors |"
    sep = "|---|---|---|---|---|---|---|---|"
    if cpu_key is not None:
        unit = "request" if cpu_key == "cpu_us_per_request" else "streamed token"
        head += f" CPU µs per {unit}: load gen / gateway proc / workers |"
        sep += "---|"
    rows = [head, sep]
    for name in PATHS:
        r = by_path[name]
        row = (
            f"| {_LABEL[name]} | {_f(r.get('p50_ms'))} | {_f(r.get('p99_ms'))} | "
            f"{_f(r.get('added_p50_ms_vs_direct'))} | {_f(r.get('added_p99_ms_vs_direct'))} | "
            f"{_f(r.get('ratio_p50_vs_direct'))} | {_f(r.get('ratio_p99_vs_direct'))} | {r['errors']} |"
        )
        if cpu_key is not None and cpu_key in r:
            c = r[cpu_key]
            row += f" {_f(c['loadgen'], 0)} / {_f(c['gateway'], 0)} / {_f(c['workers'], 0)} |"
        rows.append(row)
    return rows


def _throughputs(burst: dict[str, Any]) -> str:
    parts = []
    for name in PATHS:
        per_round = [f"{r['requests_per_s']:.0f}" for r in burst[name]["rounds"] if "requests_per_s" in r]
        parts.append(f"{name.split('_')[0]} {', '.join(per_round)}")
    return "; ".join(parts)


def _gc_line(gateway_held: dict[str, Any]) -> str:
    """The gateway's garbage-collector pauses while the held probes ran, per round."""
    rounds = [
        r["gateway_gc_during_probes"] for r in gateway_held["rounds"] if "gateway_gc_during_probes" in r
    ]
    if not rounds:
        return "Gateway GC pauses during the probes: not recorded."
    per_round = "; ".join(
        f"{g['pauses']:.0f} pauses, {g['total_ms']:.0f} ms in all, {g['over_5ms']:.0f} over 5 ms"
        for g in rounds
    )
    return (
        f"Garbage-collector pauses in the gateway process while the held probes ran, per round: {per_round}."
    )


def write_summary(results: dict[str, Any], path: Path) -> None:
    dec, e2e, m = results["decisions"], results["e2e"], results["machine"]
    s = e2e["setup"]
    lines = [
        f"# Router overhead — one run, {results['date_utc']}",
        "",
        f"Command (repo root, Python {m['python']}; the run took {results['duration_s']:.0f} s):",
        "",
        f"    .venv/bin/{results['command']}",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, shared; load average "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg_before'])} before the run, "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg_after'])} after. "
        "Written by `bench/overhead_report.py` from `results.json`; chart: `router_overhead.png`.",
        "",
        f"## 1. Per-decision cost: `Policy.choose`, {N_INSTANCES} instances, {PROMPT_TOKENS:,}-token prompts",
        "",
        *_decision_table(dec),
        "",
        f"## 2. End to end: {s['processes']}",
        "",
        f"Engine: {s['engine']}. Prompt: {s['prompt_tokens']} tokens. Router policy: `{s['policy']}`. "
        f"Each number is the {s['statistic']}. Added = path minus direct; ratio = path / direct.",
        "",
        f"### 2a. Held: {s['streams']:,} streams open through the path, {s['probes_per_round']} probe "
        "requests one at a time",
        "",
        *_e2e_table(e2e["held"], "cpu_us_per_streamed_token"),
        "",
        _gc_line(e2e["held"]["gateway_http"]),
        "",
        f"### 2b. Sequential: one request at a time, {s['probes_per_round']} per round",
        "",
        *_e2e_table(e2e["sequential"], "cpu_us_per_request"),
        "",
        f"### 2c. Burst: {s['streams']:,} requests started at the same instant",
        "",
        *_e2e_table(e2e["burst"], "cpu_us_per_request"),
        "",
        "Burst throughput (requests/s, per round): " + _throughputs(e2e["burst"]),
        "",
        "## Targets",
        "",
    ]
    for name, r in dec["policies"].items():
        if name in ("dualmap", "prefix_tree"):
            verdict = "met" if r["p99_target_met_wall"] else "NOT met"
            lines.append(
                f"- Decision P99 < {DECISION_P99_TARGET_US:.0f} µs, `{name}`: {verdict} "
                f"({_f(r['wall']['p99_us'], 1)} µs wall, {_f(r['cpu']['p99_us'], 1)} µs CPU)."
            )
    for scenario in ("held", "sequential", "burst"):
        g = e2e[scenario]["gateway_http"]
        added = g.get("added_p99_ms_vs_direct")
        verdict = "met" if added is not None and added < ADDED_P99_TARGET_MS else "NOT met"
        target = f"Gateway+router added P99 < {ADDED_P99_TARGET_MS:.0f} ms"
        per_round = ", ".join(_f(x) for x in g.get("added_p99_ms_per_round", []))
        lines.append(f"- {target}, {scenario}: {verdict} ({_f(added)} ms; per round: {per_round}).")
    lines.append("")
    path.write_text("\n".join(lines))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    e2e = results["e2e"]
    names = [n for n in PATHS if "p50_ms" in e2e["held"][n]]
    x = range(len(names))
    short = [n.replace("_", "\n", 1) for n in names]
    for ax, scenario, title in (
        (axes[0], "held", f"probe latency with {e2e['setup']['streams']:,} streams held open"),
        (axes[1], "burst", f"{e2e['setup']['streams']:,} requests started at once"),
    ):
        ax.bar([i - 0.2 for i in x], [e2e[scenario][n]["p50_ms"] for n in names], 0.4, label="P50")
        ax.bar([i + 0.2 for i in x], [e2e[scenario][n]["p99_ms"] for n in names], 0.4, label="P99")
        ax.set_xticks(list(x), short)
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.legend()

    dec = results["decisions"]
    pnames = ["trivial", *dec["policies"]]
    rows = [dec["baseline_trivial"], *dec["policies"].values()]
    if "control_fixed_work" in dec:
        pnames.append("fixed-work\ncontrol")
        rows.append(dec["control_fixed_work"])
    xs = range(len(pnames))
    ax = axes[2]
    ax.bar([i - 0.2 for i in xs], [r["wall"]["p50_us"] for r in rows], 0.4, label="P50 wall")
    ax.bar([i + 0.2 for i in xs], [r["wall"]["p99_us"] for r in rows], 0.4, label="P99 wall")
    ax.axhline(DECISION_P99_TARGET_US, color="red", linestyle="--", label="100 µs target")
    ax.set_xticks(list(xs), pnames, rotation=30, ha="right")
    ax.set_ylabel("decision latency (µs)")
    ax.set_yscale("log")
    ax.set_title(f"choose() on {N_INSTANCES} instances, {PROMPT_TOKENS:,}-token prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
