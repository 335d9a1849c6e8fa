"""Prometheus series of one KV-cache server, read from its store at scrape time.

Why a collector and not module-level counters as in ``switchyard/metrics.py``: a cache server is
its own process whose ``/metrics`` must show exactly its own store, and the store already counts
hits, misses and evictions for ``/v1/stats``. A collector bound to one store reports those
numbers at scrape time, so the two endpoints can never disagree, the hot path pays nothing
extra, and several servers in one test process do not share counters. The names follow
``switchyard/metrics.py``'s conventions (``switchyard_`` prefix, ``_bytes``, ``_total``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from switchyard.kvcache.store import BlockStore

__all__ = ["METRIC_NAMES", "KVCacheCollector", "RequestCounts", "render"]

RequestCounts = Counter[tuple[str, int]]
"""Finished requests by (operation, HTTP status); the server adds to it, the collector reads it."""

METRIC_NAMES = (
    "switchyard_kvcache_hits",
    "switchyard_kvcache_misses",
    "switchyard_kvcache_puts",
    "switchyard_kvcache_evictions",
    "switchyard_kvcache_evicted_bytes",
    "switchyard_kvcache_deletes",
    "switchyard_kvcache_requests",
    "switchyard_kvcache_used_bytes",
    "switchyard_kvcache_capacity_bytes",
    "switchyard_kvcache_blocks",
)
"""Every family this collector exports (counters get ``_total`` in the exposition)."""


class KVCacheCollector(Collector):
    """Reports one store's counters and occupancy and the server's request counts."""

    def __init__(self, store: BlockStore, requests: RequestCounts) -> None:
        self._store, self._requests = store, requests

    def collect(self) -> Iterator[Metric]:
        s = self._store.stats()
        counters = (
            ("hits", "Block reads that found their block.", s.hits),
            ("misses", "Block reads that did not find their block.", s.misses),
            ("puts", "Blocks written (new or refreshed).", s.puts),
            ("evictions", "Blocks evicted to make room, by the configured policy.", s.evictions),
            ("evicted_bytes", "Bytes (payload plus overhead) freed by evictions.", s.evicted_bytes),
            ("deletes", "Blocks removed by a delete request.", s.deletes),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(f"switchyard_kvcache_{name}", doc, value=value)
        requests = CounterMetricFamily(
            "switchyard_kvcache_requests",
            "Requests served, by operation and HTTP status code.",
            labels=["op", "code"],
        )
        for (op, code), count in sorted(self._requests.items()):
            requests.add_metric([op, str(code)], count)
        yield requests
        yield GaugeMetricFamily(
            "switchyard_kvcache_used_bytes",
            "Bytes held now: block payloads plus per-block overhead.",
            value=s.used_bytes,
        )
        yield GaugeMetricFamily(
            "switchyard_kvcache_capacity_bytes", "Most bytes the store may hold.", value=s.capacity_bytes
        )
        yield GaugeMetricFamily("switchyard_kvcache_blocks", "Blocks held now.", value=s.blocks)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and ``Content-Type`` of a ``/metrics`` response."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
