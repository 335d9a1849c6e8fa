"""Metrics of the routing benchmark, computed from raw replay outcomes.

Kept apart from the replay so that the definitions the README quotes live in one small,
unit-tested place:

* **SLO attainment** at a scale: the fraction of requests whose TTFT is at most the SLO
  (a request without a first token counts as a miss).
* **Capacity**: the highest tested rate scale at which attainment is at least ``target``
  (0.9), counting only scales reached without a failing scale below them, so one lucky point
  past a failure does not count. ``capacity_interp`` interpolates attainment linearly between
  the last passing and the first failing scale, which separates policies that pass the same
  grid point.
* **Prefix-hit rate**: engine-reported cached prompt tokens / prompt tokens.
* **Load imbalance**: max / mean busy time (summed step durations) across instances; 1.0 is
  perfectly even.
* **Idle TTFT**: a request's TTFT alone on an idle instance (its chunked prefill priced by the
  simulator's own step model). Requests whose idle TTFT exceeds the SLO miss it under any
  router, so the fraction that can meet it caps attainment; the README states that ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.replay import ReplayResult
from switchyard.workers.sim.cost import StepCostModel, StepWork, prefill_pairs

__all__ = [
    "ATTAINMENT_SLOS_S",
    "CDF_QUANTILES",
    "Capacity",
    "capacity",
    "idle_ttft_s",
    "imbalance",
    "percentile",
    "slo_attainment",
    "summarize",
]

ATTAINMENT_SLOS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

CDF_QUANTILES = (*range(0, 90), *(90 + k / 10 for k in range(101)))
"""Percentiles of TTFT kept per run (finer in the tail): enough to redraw a CDF from the JSON."""
"""Extra TTFT thresholds reported per run, so other SLOs can be read off the same runs."""


def idle_ttft_s(cost: StepCostModel, num_prompt: int, num_cached: int, chunk_tokens: int) -> float:
    """TTFT of one request alone on an idle instance with ``num_cached`` prompt tokens cached."""
    t, k = 0.0, min(num_cached, num_prompt - 1)
    while k < num_prompt:
        q = min(chunk_tokens, num_prompt - k)
        t += cost.step_time_s(StepWork(q, int(k + q == num_prompt), prefill_pairs(q, k), 0, 1))
        k += q
    return t


def slo_attainment(ttft_s: np.ndarray, slo_s: float) -> float:
    """Fraction of requests with TTFT <= ``slo_s``; NaN (no first token) is a miss."""
    if ttft_s.size == 0:
        return 0.0
    return float(np.count_nonzero(ttft_s <= slo_s)) / ttft_s.size


def percentile(values: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile ignoring NaNs (numpy's linear interpolation); None if none are left."""
    finite = values[~np.isnan(values)]
    return float(np.percentile(finite, q)) if finite.size else None


def imbalance(busy_s: Mapping[str, float]) -> float:
    """max / mean of per-instance busy time; 1.0 for an idle or perfectly even fleet."""
    values = list(busy_s.values())
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


@dataclass(frozen=True, slots=True)
class Capacity:
    """Where a policy's attainment curve crosses the target."""

    scale: float | None
    """Highest tested scale passing, with every lower tested scale passing; None if the lowest fails."""
    scale_interp: float | None
    """Scale at which attainment crosses ``target``, linear between the bracketing points."""
    saturated: bool
    """True when every tested scale passed: the real capacity is at least ``scale``."""


def capacity(points: Sequence[tuple[float, float]], target: float = 0.9) -> Capacity:
    """Capacity from ``(scale, attainment)`` points (any order)."""
    pts = sorted(points)
    passing: tuple[float, float] | None = None
    for s, a in pts:
        if a < target:
            if passing is None:
                return Capacity(None, None, False)
            s0, a0 = passing
            interp = s0 + (s - s0) * (a0 - target) / (a0 - a) if a0 > a else s0
            return Capacity(s0, interp, False)
        passing = (s, a)
    if passing is None:
        return Capacity(None, None, False)
    return Capacity(passing[0], passing[0], True)


def _r(x: float | None, digits: int = 6) -> float | None:
    """Round to ``digits`` significant digits for readable JSON; None and NaN become None."""
    if x is None or math.isnan(x):
        return None
    return float(f"{x:.{digits}g}")


def summarize(result: ReplayResult, slo_s: float, base_rate: float) -> dict[str, Any]:
    """The JSON record of one (policy, scale) run."""
    ttft, tpot = result.ttft_s, result.tpot_s
    return {
        "policy": result.policy,
        "scale": result.scale,
        "rate_req_s": _r(result.scale * base_rate),
        "requests": int(ttft.size),
        "slo_attainment": _r(slo_attainment(ttft, slo_s)),
        "attainment_at_ttft_s": {f"{s:g}": _r(slo_attainment(ttft, s)) for s in ATTAINMENT_SLOS_S},
        "ttft_s": {f"p{q}": _r(percentile(ttft, q)) for q in (50, 90, 99)},
        "ttft_quantiles_s": [_r(float(v), 4) for v in np.nanpercentile(ttft, CDF_QUANTILES)]
        if np.any(~np.isnan(ttft))
        else [],
        "ttft_mean_s": _r(float(np.nanmean(ttft)) if ttft.size else None),
        "tpot_s": {f"p{q}": _r(percentile(tpot, q)) for q in (50, 90, 99)},
        "tpot_mean_s": _r(float(np.nanmean(tpot)) if np.any(~np.isnan(tpot)) else None),
        "prefix_hit_rate": _r(result.cached_tokens / result.prompt_tokens if result.prompt_tokens else 0.0),
        "cached_tokens": result.cached_tokens,
        "prompt_tokens": result.prompt_tokens,
        "imbalance_busy_max_over_mean": _r(imbalance(result.busy_s)),
        "busy_s": {k: _r(v) for k, v in result.busy_s.items()},
        "requests_per_instance": result.requests_per_instance,
        "decision_outcomes": result.outcomes,
        "decisions_sha256": result.decisions_sha256,
        "routers": result.routers,
        "replica_agreement": result.agreement,
        "preemptions": result.num_preemptions,
        "virtual_end_s": _r(result.virtual_end_s),
        "decision_us_mean": _r(result.decision_us_mean, 3),
        "wall_s": _r(result.wall_s, 3),
        "cpu_s": _r(result.cpu_s, 3),
        "ttft_estimate_error_s": {
            "_what": "measured TTFT minus the policy's TTFT estimate for its choice (TtftFeedback policies)",
            "p50": _r(percentile(result.ttft_estimate_error_s, 50)),
            "p50_abs": _r(percentile(np.abs(result.ttft_estimate_error_s), 50)),
            "p90_abs": _r(percentile(np.abs(result.ttft_estimate_error_s), 90)),
        },
    }
