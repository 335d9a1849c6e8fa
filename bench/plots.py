"""PNG figures of the routing benchmark (matplotlib, Agg backend: no display needed).

Two figures per run directory, because they answer the two questions the issue asks:
``capacity.png`` (how much load each policy sustains under the TTFT SLO, and how its tail
latency grows) and ``ttft_cdf.png`` (the whole TTFT distribution of every policy at one
scale, where the difference between policies is visible rather than just a crossing point).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FormatStrFormatter

from bench.metrics import CDF_QUANTILES

__all__ = ["plot_capacity", "plot_latency_cdfs", "plot_ttft_cdf"]


def plot_capacity(
    runs: Sequence[Mapping[str, Any]],
    *,
    slo_s: float,
    target: float,
    base_rate: float,
    title: str,
    path: Path,
) -> None:
    """SLO attainment and P99 TTFT against the rate scale, one line per policy."""
    fig, (ax_att, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for policy in sorted({r["policy"] for r in runs}):
        pts = sorted((r["scale"], r) for r in runs if r["policy"] == policy)
        scales = [s for s, _ in pts]
        ax_att.plot(scales, [r["slo_attainment"] for _, r in pts], marker="o", label=policy)
        ax_p99.plot(scales, [r["ttft_s"]["p99"] for _, r in pts], marker="o", label=policy)
    ax_att.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax_att.set_xlabel(f"arrival-rate scale (x {base_rate:.3g} req/s)")
    ax_att.set_ylabel(f"fraction of requests with TTFT <= {slo_s:g} s")
    ax_att.set_ylim(0, 1.02)
    ax_att.set_title("SLO attainment")
    ax_att.legend(loc="lower left")
    ax_p99.axhline(slo_s, color="grey", linestyle="--", linewidth=1)
    ax_p99.set_xlabel(f"arrival-rate scale (x {base_rate:.3g} req/s)")
    ax_p99.set_ylabel("P99 TTFT (s)")
    ax_p99.set_yscale("log")
    ax_p99.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_p99.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax_p99.set_title("P99 TTFT")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttft_cdf(
    quantiles: Mapping[str, Sequence[float]], *, slo_s: float, scale: float, title: str, path: Path
) -> None:
    """TTFT CDF per policy at one scale (from ``CDF_QUANTILES`` percentiles), log time axis."""
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    frac = np.array(CDF_QUANTILES) / 100.0
    for policy in sorted(quantiles):
        values = np.asarray(quantiles[policy], dtype=float)
        if values.size == frac.size:
            ax.plot(np.maximum(values, 1e-3), frac, label=policy)
    ax.axvline(slo_s, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{title}\nTTFT CDF at rate scale {scale:g}")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdfs(
    rows: Mapping[float, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    slo_s: float,
    title: str,
    path: Path,
) -> None:
    """TTFT and TPOT CDFs side by side, one row per rate scale, one line per labelled run.

    ``rows[scale][label]`` holds the run's TTFT and TPOT percentiles at ``CDF_QUANTILES``.
    """
    frac = np.array(CDF_QUANTILES) / 100.0
    fig, axes = plt.subplots(
        len(rows), 2, figsize=(12, 3.6 * len(rows)), squeeze=False, constrained_layout=True
    )
    for (scale, runs), (ax_ttft, ax_tpot) in zip(sorted(rows.items()), axes, strict=True):
        for k, label in enumerate(sorted(runs)):
            ttft, tpot = (np.asarray(v, dtype=float) for v in runs[label])
            style = ("-", "--", ":", "-.")[k % 4]  # runs that coincide stay visible
            if ttft.size == frac.size:
                ax_ttft.plot(np.maximum(ttft, 1e-3), frac, linestyle=style, label=label)
            if tpot.size == frac.size:
                ax_tpot.plot(1000 * tpot, frac, linestyle=style, label=label)
        ax_ttft.axvline(slo_s, color="grey", linestyle="--", linewidth=1)
        ax_ttft.set_xscale("log")
        ax_ttft.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax_ttft.set_xlabel("TTFT (s)")
        ax_tpot.set_xlabel("TPOT (ms)")
        for ax, what in ((ax_ttft, "TTFT"), (ax_tpot, "TPOT")):
            ax.set_ylabel("fraction of requests")
            ax.set_ylim(0, 1.01)
            ax.set_title(f"{what} CDF at rate scale {scale:g}")
            ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
