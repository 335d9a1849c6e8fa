"""Autoscaling decisions for a service's pools: a pure function of router metrics and pool bounds.

Why a pure function: the rules are the part worth testing exhaustively (a decision table, no
cluster, no clock), and the operator's loop (``handlers/autoscaling.py``) only gathers inputs,
calls ``decide`` and writes the result. The loop does not resize StatefulSets itself: it sets
each ServingPool's ``spec.replicas``, and the pool's reconcile performs the change, draining
pods before any scale-in, whoever asked for it (this autoscaler, ``kubectl scale``, an HPA).

Rules, per autoscaled pool (bounds ``[min, max]``, targets from its autoscaling spec):

1. No metrics (router unreachable)      -> hold (``NoMetrics``).
2. The pool's SLO signal misses target  -> scale out (``SLOMiss``). Prefill and unified pools
   follow TTFT attainment; decode pools follow TPOT attainment when the service sets a TPOT SLO.
   Step: proportional to the shortfall (``ceil(R * target / attained)``), at least +1, at most
   doubling, capped at max.
3. KV usage above target                -> scale out (``KVPressure``), step as above by usage.
4. SLO met (or no traffic) and KV usage below ``scaleInKvUsage`` -> scale in by ONE replica
   (``LowUtilization``), and only when the last change is older than the cool-down; scale-in is
   gradual because every removed pod is drained first and cache affinity is lost with it.
5. Otherwise hold (``Steady``); bounds always win (``AtMax`` / ``AtMin`` name a blocked move).

Then the prefill:decode band: with both roles present, ``sum(prefill) / sum(decode)`` must stay
within ``[ratio_min, ratio_max]``. A violation first raises the short side (within its max),
then lowers the long side (within its min); changed pools get reason ``RatioBand``. Raising
first means a scale-in that would break the band is undone rather than the other side shrunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["PoolInput", "ScaleDecision", "ServiceSignals", "decide"]

Role = Literal["prefill", "decode", "unified"]


@dataclass(frozen=True, slots=True)
class PoolInput:
    """One pool as the autoscaler sees it."""

    name: str
    role: Role
    replicas: int
    """Current desired replicas (the pool's ``spec.replicas``)."""
    min_replicas: int
    max_replicas: int
    autoscaled: bool = True
    """False: the pool is fixed; it still counts in the P:D band but is never changed."""
    target_slo_attainment: float = 0.9
    """Fraction of requests that must meet the SLO; below it the pool grows."""
    target_kv_usage: float = 0.8
    """KV usage above which the pool grows."""
    scale_in_kv_usage: float = 0.3
    """KV usage below which (with the SLO met) the pool may shrink by one."""
    kv_usage: float | None = None
    """Mean KV usage of the pool's instances; None when the router reports none."""
    seconds_since_last_change: float = math.inf


@dataclass(frozen=True, slots=True)
class ServiceSignals:
    """Service-wide inputs: attainment over the last interval (None: no traffic) and the band."""

    metrics_available: bool = True
    ttft_attainment: float | None = None
    tpot_attainment: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    scale_in_cooldown_s: float = 300.0


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """What to do with one pool, and why (the reason is a CamelCase word, the message a sentence)."""

    pool: str
    role: Role
    current: int
    desired: int
    reason: str
    message: str

    @property
    def changed(self) -> bool:
        return self.desired != self.current


def _step_out(current: int, pressure: float, cap: int) -> int:
    grown = math.ceil(current * min(pressure, 2.0)) if current > 0 else 1
    return min(max(grown, current + 1), cap)


def _decide_pool(pool: PoolInput, sig: ServiceSignals) -> ScaleDecision:
    def out(desired: int, reason: str, message: str) -> ScaleDecision:
        return ScaleDecision(pool.name, pool.role, pool.replicas, desired, reason, message)

    bounded = min(max(pool.replicas, pool.min_replicas), pool.max_replicas)
    if bounded != pool.replicas:
        return out(
            bounded, "Bounds", f"replicas {pool.replicas} outside [{pool.min_replicas}, {pool.max_replicas}]"
        )
    if not pool.autoscaled:
        return out(pool.replicas, "Fixed", "pool is not autoscaled")
    if not sig.metrics_available:
        return out(pool.replicas, "NoMetrics", "router metrics unavailable; holding")
    slo = sig.tpot_attainment if pool.role == "decode" else sig.ttft_attainment
    slo_name = "TPOT" if pool.role == "decode" else "TTFT"
    target = pool.target_slo_attainment
    if slo is not None and slo < target:
        if pool.replicas >= pool.max_replicas:
            return out(pool.replicas, "AtMax", f"{slo_name} attainment {slo:.2f} < {target:.2f} at max")
        desired = _step_out(pool.replicas, target / max(slo, 1e-3), pool.max_replicas)
        return out(desired, "SLOMiss", f"{slo_name} attainment {slo:.2f} < target {target:.2f}")
    kv = pool.kv_usage
    if kv is not None and kv > pool.target_kv_usage:
        if pool.replicas >= pool.max_replicas:
            return out(pool.replicas, "AtMax", f"KV usage {kv:.2f} > {pool.target_kv_usage:.2f} at max")
        desired = _step_out(pool.replicas, kv / pool.target_kv_usage, pool.max_replicas)
        return out(desired, "KVPressure", f"KV usage {kv:.2f} > target {pool.target_kv_usage:.2f}")
    if kv is not None and kv < pool.scale_in_kv_usage:
        if pool.replicas <= pool.min_replicas:
            return out(pool.replicas, "AtMin", f"KV usage {kv:.2f} low, already at min")
        if pool.seconds_since_last_change < sig.scale_in_cooldown_s:
            return out(pool.replicas, "Cooldown", "low utilization, waiting for the scale-in cool-down")
        return out(pool.replicas - 1, "LowUtilization", f"KV usage {kv:.2f} < {pool.scale_in_kv_usage:.2f}")
    return out(pool.replicas, "Steady", "within targets")


def _apply_band(decisions: list[ScaleDecision], pools: Sequence[PoolInput], sig: ServiceSignals) -> None:
    lo, hi = sig.ratio_min, sig.ratio_max
    by_name = {p.name: p for p in pools}
    prefill = [i for i, d in enumerate(decisions) if d.role == "prefill"]
    decode = [i for i, d in enumerate(decisions) if d.role == "decode"]
    if not prefill or not decode or (lo is None and hi is None):
        return

    def total(idx: list[int]) -> int:
        return sum(decisions[i].desired for i in idx)

    def shift(idx: list[int], amount: int) -> int:
        """Move the role's total by ``amount`` (+ grow, - shrink) within bounds; returns what moved."""
        moved = 0
        for i in idx:
            pool = by_name[decisions[i].pool]
            if not pool.autoscaled:
                continue
            room = (
                pool.max_replicas - decisions[i].desired
                if amount > 0
                else pool.min_replicas - decisions[i].desired
            )
            step = min(amount - moved, room) if amount > 0 else max(amount - moved, room)
            if step:
                d = decisions[i]
                decisions[i] = replace(
                    d, desired=d.desired + step, reason="RatioBand", message=f"keep P:D within [{lo}, {hi}]"
                )
                moved += step
            if moved == amount:
                break
        return moved

    p, d = total(prefill), total(decode)
    if hi is not None and d > 0 and p / d > hi:
        shift(decode, math.ceil(p / hi) - d)
        p, d = total(prefill), total(decode)
        if p / d > hi:
            shift(prefill, math.floor(hi * d) - p)
    elif lo is not None and d > 0 and p / d < lo:
        shift(prefill, math.ceil(lo * d) - p)
        p, d = total(prefill), total(decode)
        if p / d < lo:
            shift(decode, math.floor(p / lo) - d)


def decide(pools: Sequence[PoolInput], signals: ServiceSignals) -> list[ScaleDecision]:
    """One decision per pool, in input order (see the module docstring for the rules)."""
    decisions = [_decide_pool(pool, signals) for pool in pools]
    if signals.metrics_available:
        _apply_band(decisions, pools, signals)
    return decisions
