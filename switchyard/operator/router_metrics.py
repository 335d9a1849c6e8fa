"""What the operator reads from a router's ``/metrics``: SLO attainment, KV usage, running requests.

The autoscaler and the scale-in drain both need numbers only the router has. They get them
through two small interfaces, so tests script them and a later Prometheus-backed source can
replace the HTTP scrape without touching the decision code:

- ``MetricsSource.scrape(url)`` returns Prometheus text; ``HttpMetricsSource`` GETs the router
  Service's ``/metrics`` (one replica answers: with several router replicas this is a sample,
  which is acceptable for a trend-following autoscaler, and a Prometheus source is the fix).
- ``DrainClient.running_requests(router_url, pod)`` returns the requests still running on a
  pod's instances. ``MetricsDrainClient`` sums ``switchyard_instance_running_requests`` over the
  instances named after the pod (ids ``<pod>`` or ``<pod>-<k>``); it answers None when the router
  reports no such instance, and the caller then waits for its drain timeout rather than assume
  the pod is empty. The migration issue replaces this with a real drain API (migrate running
  requests away, stop routing to the pod) behind the same interface.

Attainment is computed from histogram buckets like Prometheus' ``histogram_quantile`` in
reverse: the fraction of observations at or below the SLO, interpolating linearly inside the
bucket that contains it. Counters are cumulative, so callers pass the previous scrape to get the
attainment of the last interval; a router restart (counts going down) falls back to cumulative.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "DrainClient",
    "HttpMetricsSource",
    "MetricsDrainClient",
    "MetricsSource",
    "RouterSnapshot",
    "attainment",
    "parse_router_metrics",
]

TTFT_METRIC = "switchyard_request_ttft_seconds"
TPOT_METRIC = "switchyard_request_tpot_seconds"
KV_USAGE_METRIC = "switchyard_instance_kv_usage_ratio"
RUNNING_METRIC = "switchyard_instance_running_requests"


class MetricsSource(Protocol):
    """Returns the Prometheus text exposition served at ``url``; raises OSError when unreachable."""

    def scrape(self, url: str) -> str: ...


class DrainClient(Protocol):
    """Requests still running on a pod's instances; None when the router does not know the pod."""

    def running_requests(self, router_url: str, pod_name: str) -> int | None: ...


class HttpMetricsSource:
    """GETs ``url`` with a short timeout (a blocking call: used from sync handlers only)."""

    def __init__(self, *, timeout_s: float = 5.0) -> None:
        self._timeout_s = timeout_s

    def scrape(self, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise OSError(f"not an http(s) URL: {url}")
        with urllib.request.urlopen(url, timeout=self._timeout_s) as resp:
            body: bytes = resp.read()
        return body.decode()


@dataclass(frozen=True, slots=True)
class RouterSnapshot:
    """The router numbers one scrape gives: cumulative histograms and per-instance gauges."""

    ttft_buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative count per upper bound (``le``), summed over models and policies."""
    tpot_buckets: dict[float, float] = field(default_factory=dict)
    kv_usage: dict[str, float] = field(default_factory=dict)
    """Instance id -> fraction of its KV blocks in use."""
    running: dict[str, float] = field(default_factory=dict)
    """Instance id -> requests running on it."""

    def pool_kv_usage(self, pool: str) -> float | None:
        """Mean KV usage of the instances of ``pool`` (ids ``<pool>-<i>``), None when it has none."""
        values = [v for k, v in self.kv_usage.items() if k.startswith(f"{pool}-")]
        return sum(values) / len(values) if values else None


def parse_router_metrics(text: str) -> RouterSnapshot:
    """Extract the series the operator uses from a ``/metrics`` body; other series are ignored."""
    snap = RouterSnapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{TTFT_METRIC}_bucket":
                le = float(sample.labels["le"])
                snap.ttft_buckets[le] = snap.ttft_buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{TPOT_METRIC}_bucket":
                le = float(sample.labels["le"])
                snap.tpot_buckets[le] = snap.tpot_buckets.get(le, 0.0) + sample.value
            elif sample.name == KV_USAGE_METRIC:
                snap.kv_usage[sample.labels["instance_id"]] = sample.value
            elif sample.name == RUNNING_METRIC:
                snap.running[sample.labels["instance_id"]] = sample.value
    return snap


def _delta(now: Mapping[float, float], before: Mapping[float, float] | None) -> dict[float, float]:
    if not before or any(now.get(le, 0.0) < count for le, count in before.items()):
        return dict(now)  # first scrape, or the router restarted: use the cumulative counts
    return {le: count - before.get(le, 0.0) for le, count in now.items()}


def attainment(
    buckets: Mapping[float, float], slo_s: float, *, before: Mapping[float, float] | None = None
) -> tuple[float | None, float]:
    """(fraction of observations <= ``slo_s``, observation count) over the interval since ``before``.

    The fraction is None when nothing was observed (no traffic: nothing to attain or miss).
    """
    counts = _delta(buckets, before)
    total = counts.get(math.inf, max(counts.values(), default=0.0))
    if total <= 0:
        return None, 0.0
    lower_le, lower_count = 0.0, 0.0
    for le in sorted(counts):
        count = counts[le]
        if le >= slo_s:
            if math.isinf(le):
                return lower_count / total, total
            share = (slo_s - lower_le) / (le - lower_le) if le > lower_le else 1.0
            return (lower_count + share * (count - lower_count)) / total, total
        lower_le, lower_count = le, count
    return lower_count / total, total


class MetricsDrainClient:
    """Drain progress from the router's per-instance ``running`` gauge (see the module docstring)."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def running_requests(self, router_url: str, pod_name: str) -> int | None:
        snap = parse_router_metrics(self._source.scrape(f"{router_url.rstrip('/')}/metrics"))
        # Instance <pool>-<i> is pinned to pod <pool>-worker-<i> (PoolConfig.instance_resource).
        pool, _, ordinal = pod_name.rpartition("-worker-")
        instance = f"{pool}-{ordinal}" if pool else pod_name
        mine = [v for k, v in snap.running.items() if k == instance]
        return int(sum(mine)) if mine else None
