"""Every Prometheus metric Switchyard exports, declared once.

Framework code (router core, worker service, actors, operator) records these; policies and
engines only return data and never import ``prometheus_client`` (llm-d's split), so a metric's
name, labels and buckets are decided here and nowhere else. Names live under ``switchyard_``
and follow Prometheus conventions (``_seconds``, ``_total``, ``_ratio``).

The metrics hang off a module-level ``REGISTRY`` rather than prometheus_client's global one:
the gateway serves exactly Switchyard's series from ``/metrics`` (``render_latest``), and
libraries that register into the global default registry cannot collide with ours.

Cost note: ``Metric.labels(...)`` takes a lock and hashes the label tuple. Hot paths resolve
their label children once (per model/policy/instance) and reuse them; ``observe``/``inc`` on
a resolved child is a few hundred nanoseconds.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "DRAINS",
    "DRAIN_REQUESTS",
    "FAILOVERS",
    "GC_PAUSES",
    "INSTANCES",
    "INSTANCE_KV_USAGE",
    "INSTANCE_RUNNING",
    "INSTANCE_WAITING",
    "MIGRATIONS_COMPLETED",
    "MIGRATIONS_FAILED",
    "MIGRATIONS_STARTED",
    "MIGRATION_BLOCKS",
    "MIGRATION_BYTES",
    "MIGRATION_DOWNTIME",
    "MIGRATION_DURATION",
    "REBALANCER_ACTIONS",
    "REGISTRY",
    "REQUESTS",
    "REQUEST_E2E",
    "REQUEST_TPOT",
    "REQUEST_TTFT",
    "ROUTER_DECISION_LATENCY",
    "ROUTER_TTFT_ESTIMATE_ERROR",
    "ROUTING_DECISIONS",
    "ModelRequestMetrics",
    "forget_instance",
    "render_latest",
    "unwatch_gc_pauses",
    "watch_gc_pauses",
]

REGISTRY = CollectorRegistry(auto_describe=True)
"""Switchyard's own registry; ``render_latest`` serialises it for ``/metrics``."""

# Buckets: TTFT spans a cached short prompt (ms) to a long queue (tens of s); TPOT is one
# decode step (ms) up to a badly overloaded batch; e2e covers long generations.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# A policy decision is pure CPU over in-memory state: microseconds, or it is a bug.
_DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)
# Measured minus estimated TTFT: signed, symmetric around 0 (negative: the estimate was pessimistic).
_ESTIMATE_ERROR_BUCKETS = (
    *(-b for b in (10.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005)),
    0.0,
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)

REQUEST_TTFT = Histogram(
    "switchyard_request_ttft_seconds",
    "Time from the router receiving a request to its first output token.",
    ["model", "policy"],
    buckets=_TTFT_BUCKETS,
    registry=REGISTRY,
)
REQUEST_TPOT = Histogram(
    "switchyard_request_tpot_seconds",
    "Mean time per output token after the first, one sample per request.",
    ["model", "policy"],
    buckets=_TPOT_BUCKETS,
    registry=REGISTRY,
)
REQUEST_E2E = Histogram(
    "switchyard_request_e2e_seconds",
    "Time from the router receiving a request to its end, whatever the outcome.",
    ["model", "policy"],
    buckets=_E2E_BUCKETS,
    registry=REGISTRY,
)
REQUESTS = Counter(
    "switchyard_requests",
    "Requests that ended, by outcome (finished, aborted, cancelled, error).",
    ["model", "outcome"],
    registry=REGISTRY,
)
ROUTING_DECISIONS = Counter(
    "switchyard_routing_decisions",
    "Routing decisions by policy and outcome (affinity, slo_switch, load).",
    ["policy", "outcome"],
    registry=REGISTRY,
)
ROUTER_DECISION_LATENCY = Histogram(
    "switchyard_router_decision_latency_seconds",
    "Time a policy took to choose an instance for one request.",
    ["policy"],
    buckets=_DECISION_BUCKETS,
    registry=REGISTRY,
)
ROUTER_TTFT_ESTIMATE_ERROR = Histogram(
    "switchyard_router_ttft_estimate_error_seconds",
    "Measured minus policy-estimated time from dispatch to first output (TTFT-estimating policies).",
    ["policy"],
    buckets=_ESTIMATE_ERROR_BUCKETS,
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "switchyard_failovers",
    "Requests resubmitted to another instance after theirs died mid-request.",
    ["model"],
    registry=REGISTRY,
)
INSTANCES = Gauge(
    "switchyard_instances",
    "Instances in the router's current membership, per served model.",
    ["model"],
    registry=REGISTRY,
)
INSTANCE_RUNNING = Gauge(
    "switchyard_instance_running_requests",
    "Requests running on an instance, as of its latest load report.",
    ["instance_id"],
    registry=REGISTRY,
)
INSTANCE_WAITING = Gauge(
    "switchyard_instance_waiting_requests",
    "Requests queued on an instance, as of its latest load report.",
    ["instance_id"],
    registry=REGISTRY,
)
INSTANCE_KV_USAGE = Gauge(
    "switchyard_instance_kv_usage_ratio",
    "Fraction of an instance's KV-cache blocks in use, as of its latest load report.",
    ["instance_id"],
    registry=REGISTRY,
)

# Migration downtime is one control round trip + one tail pull + one step: ms on a GPU,
# tens of ms on CPU; a whole migration adds the pre-copy stages (up to seconds).
_DOWNTIME_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MIGRATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

MIGRATIONS_STARTED = Counter(
    "switchyard_migrations_started",
    "Live migrations of running requests attempted.",
    registry=REGISTRY,
)
MIGRATIONS_COMPLETED = Counter(
    "switchyard_migrations_completed",
    "Live migrations that moved a request with its KV cache to the destination.",
    registry=REGISTRY,
)
MIGRATIONS_FAILED = Counter(
    "switchyard_migrations_failed",
    "Migrations that did not move the KV, by what became of the request (stayed on the source, "
    "recomputed, finished, lost to failover) and reason.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
MIGRATION_DOWNTIME = Histogram(
    "switchyard_migration_downtime_seconds",
    "Time from suspending a request on its source to its first token on the destination.",
    buckets=_DOWNTIME_BUCKETS,
    registry=REGISTRY,
)
MIGRATION_DURATION = Histogram(
    "switchyard_migration_duration_seconds",
    "Time one migration attempt took, pre-copy stages included, whatever its outcome.",
    buckets=_MIGRATION_BUCKETS,
    registry=REGISTRY,
)
MIGRATION_BLOCKS = Counter(
    "switchyard_migration_blocks",
    "KV blocks pulled by migration destinations (pre-copy stages plus the final tail).",
    registry=REGISTRY,
)
MIGRATION_BYTES = Counter(
    "switchyard_migration_bytes",
    "KV bytes pulled by migration destinations (blocks times the model's bytes per block).",
    registry=REGISTRY,
)

REBALANCER_ACTIONS = Counter(
    "switchyard_rebalancer_actions",
    "Moves the hotspot rebalancer made, by action (migrate) and the migration's outcome "
    "(moved, recomputed, finished, stayed, lost, error).",
    ["action", "outcome"],
    registry=REGISTRY,
)
DRAINS = Counter(
    "switchyard_drains",
    "Instance drains, by outcome: complete (no request left on it) or incomplete (deadline).",
    ["outcome"],
    registry=REGISTRY,
)
DRAIN_REQUESTS = Counter(
    "switchyard_drain_requests",
    "Requests a drain dealt with, by result: moved (migrated off), finished (ended in place), "
    "failed (still there at the deadline, or lost by its migration and failed over).",
    ["result"],
    registry=REGISTRY,
)

# A pause stalls every stream the process serves: sub-ms young collections up to full ones
# over a large heap (tens of ms, measured in the router-overhead benchmark's gateway).
_GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

GC_PAUSES = Histogram(
    "switchyard_gc_pause_seconds",
    "Pauses of this process's cyclic garbage collector, by generation (0 youngest, 2 full); "
    "every request the process serves stalls for each one.",
    ["generation"],
    buckets=_GC_PAUSE_BUCKETS,
    registry=REGISTRY,
)

_OUTCOMES = ("finished", "aborted", "cancelled", "error")  # label values of switchyard_requests_total


class ModelRequestMetrics:
    """One model's request series, label children resolved once (the router's hot path never
    calls ``labels()``)."""

    def __init__(self, model: str, policy: str) -> None:
        self.ttft = REQUEST_TTFT.labels(model, policy)
        self.tpot = REQUEST_TPOT.labels(model, policy)
        self.e2e = REQUEST_E2E.labels(model, policy)
        self.failovers = FAILOVERS.labels(model)
        self.requests = {o: REQUESTS.labels(model, o) for o in _OUTCOMES}


_PER_INSTANCE = (INSTANCE_RUNNING, INSTANCE_WAITING, INSTANCE_KV_USAGE)


def forget_instance(instance_id: str) -> None:
    """Drop a departed instance's series, so dashboards do not show stale load forever."""
    for gauge in _PER_INSTANCE:
        gauge.remove(instance_id)


_gc_watch: list[Callable[[str, dict[str, int]], None]] = []


def watch_gc_pauses() -> None:
    """Time every garbage collection of this process into ``switchyard_gc_pause_seconds``.

    Why: a collection stops the event loop, so its pause lands on every open stream's latency
    at once; Prometheus' default process collectors count collections but do not time them.
    Idempotent; the callback costs about a microsecond per collection.
    """
    if _gc_watch:
        return
    children = [GC_PAUSES.labels(str(g)) for g in range(3)]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            children[info["generation"]].observe(time.perf_counter() - started[0])

    _gc_watch.append(on_gc)
    gc.callbacks.append(on_gc)


def unwatch_gc_pauses() -> None:
    """Stop timing collections (``stop_gateway`` calls it, so nothing is left hooked into the
    collector once the gateway is gone, interpreter shutdown included)."""
    while _gc_watch:
        callback = _gc_watch.pop()
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)


def render_latest() -> tuple[bytes, str]:
    """The body and ``Content-Type`` of a ``/metrics`` response (text exposition format)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
