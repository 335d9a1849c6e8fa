"""What one scrape of a service's router says about the service and its pools, as status values.

Why a pure module: the autoscaler's loop turns a scrape (or its failure) into the numbers that
``kubectl get`` shows (``status.sloAttainment``, ``status.kvUsage``) and into the
``MetricsAvailable`` condition that explains a blank column. Computing those is a function of
the scrape, the previous scrape and the SLOs, tested as a table; the handler only writes them.

What the numbers mean. The router's latency histograms are per service (labelled by model and
policy, not by pool), so:

- an LLMService's ``sloAttainment`` is the lower of its TTFT and TPOT attainment over the last
  interval: an upper bound on the share of requests that met both objectives (the router
  does not record the two per request jointly);
- a ServingPool's ``sloAttainment`` is the attainment of the objective its role serves, the
  same signal the autoscaler steers that pool by: TTFT for ``prefill`` and ``unified``, TPOT for
  ``decode``;
- a pool's ``kvUsage`` is the mean KV usage its instances (``<pool>-<i>``) report.

Values are rounded to three decimals so a steady service does not rewrite its status on every
tick. With no requests in the interval attainment is unknown, not 1.0: the last measured value
stays (a column that blanks between bursts of traffic helps no one) and the condition says
``NoTraffic``. The first scrape the operator makes of a router is only a baseline
(``Baseline``): the router's counters reach back to its own start, and a restarted operator
must not scale on days of history. An unreachable router clears every value (numbers the
operator can no longer vouch for mislead more than a blank column) and sets
``MetricsAvailable=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from switchyard.operator.crd.conditions import Condition
from switchyard.operator.router_metrics import RouterSnapshot, attainment

__all__ = ["METRICS_CONDITION", "PoolObservation", "ServiceObservation", "observe", "unavailable"]

METRICS_CONDITION = "MetricsAvailable"
"""Condition type the autoscaler's loop owns on LLMServices and ServingPools."""

Role = Literal["prefill", "decode", "unified"]


def _round(value: float | None) -> float | None:
    return None if value is None else round(min(max(value, 0.0), 1.0), 3)


def _attainment_field(value: float | None, *, clear: bool) -> dict[str, float | None]:
    """``sloAttainment`` to write: the value; nothing (keep the last) when unknown; None (delete
    the key, in a merge patch) when ``clear``."""
    if clear:
        return {"sloAttainment": None}
    return {} if value is None else {"sloAttainment": value}


@dataclass(frozen=True, slots=True)
class PoolObservation:
    """One pool's status values from a scrape."""

    slo_attainment: float | None = None
    kv_usage: float | None = None
    clear: bool = False
    """The router was not read: delete the values rather than keep them."""

    def status(self) -> dict[str, float | None]:
        """Status keys to write (None deletes a key in a merge patch)."""
        return {**_attainment_field(self.slo_attainment, clear=self.clear), "kvUsage": self.kv_usage}


@dataclass(frozen=True, slots=True)
class ServiceObservation:
    """A service's status values from a scrape, its pools' values and the condition explaining them."""

    available: bool
    reason: str
    """``Scraped``, ``NoTraffic``, ``Baseline`` (first scrape) or ``RouterUnreachable``."""
    message: str
    ttft_attainment: float | None = None
    tpot_attainment: float | None = None
    pools: dict[str, PoolObservation] = field(default_factory=dict)

    @property
    def slo_attainment(self) -> float | None:
        known = [v for v in (self.ttft_attainment, self.tpot_attainment) if v is not None]
        return min(known) if known else None

    def condition(self) -> Condition:
        return Condition(METRICS_CONDITION, "True" if self.available else "False", self.reason, self.message)

    def status(self) -> dict[str, float | None]:
        return _attainment_field(_round(self.slo_attainment), clear=not self.available)


def unavailable(error: str, pools: Mapping[str, Role]) -> ServiceObservation:
    """The router could not be scraped: every value unknown, the condition says why."""
    return ServiceObservation(
        available=False,
        reason="RouterUnreachable",
        message=f"router metrics unavailable: {error}"[:1024],
        pools={name: PoolObservation(clear=True) for name in pools},
    )


def observe(
    snap: RouterSnapshot,
    previous: RouterSnapshot | None,
    *,
    ttft_slo_s: float,
    tpot_slo_s: float,
    pools: Mapping[str, Role],
) -> ServiceObservation:
    """Status values from ``snap``; attainment covers the interval since ``previous``.

    Without a previous scrape (the operator just started, or the service is new to it) the
    scrape is only a baseline: the router's counters go back to its own start, possibly days,
    and steering by them would scale on history. KV usage, a gauge, is reported at once.
    """
    ttft = tpot = None
    if previous is not None:
        ttft = _round(attainment(snap.ttft_buckets, ttft_slo_s, before=previous.ttft_buckets)[0])
        tpot = _round(attainment(snap.tpot_buckets, tpot_slo_s, before=previous.tpot_buckets)[0])
    observed = {
        name: PoolObservation(
            slo_attainment=tpot if role == "decode" else ttft,
            kv_usage=_round(snap.pool_kv_usage(name)),
        )
        for name, role in pools.items()
    }
    if previous is None:
        message = "first scrape: attainment is measured over the intervals after it"
        return ServiceObservation(True, "Baseline", message, None, None, observed)
    if ttft is None and tpot is None:
        return ServiceObservation(
            True, "NoTraffic", "no requests finished in the last interval", None, None, observed
        )
    parts = [
        f"{what} attainment {value:.3f}"
        for what, value in (("TTFT", ttft), ("TPOT", tpot))
        if value is not None
    ]
    message = ", ".join(parts) + " over the last interval"
    return ServiceObservation(True, "Scraped", message, ttft, tpot, observed)
