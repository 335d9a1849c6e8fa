"""The autoscaler: a decision table over the pure rules, metrics parsing, and one timer tick."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import pytest

from switchyard.operator.autoscaling.decision import PoolInput, ServiceSignals, decide
from switchyard.operator.crd.conditions import Condition
from switchyard.operator.handlers.autoscaling import run_autoscaler, write_observed_status
from switchyard.operator.kube import ApiError
from switchyard.operator.router_metrics import (
    MetricsDrainClient,
    RouterSnapshot,
    attainment,
    parse_router_metrics,
)
from tests.operator.harness import FakeMetrics, fast_options, load_examples


def pool(name: str = "p", role: Any = "unified", replicas: int = 2, **kw: Any) -> PoolInput:
    values: dict[str, Any] = {"min_replicas": 1, "max_replicas": 8, **kw}
    return PoolInput(name=name, role=role, replicas=replicas, **values)


def one(p: PoolInput, **signals: Any) -> tuple[int, str]:
    (d,) = decide([p], ServiceSignals(**signals))
    return d.desired, d.reason


@pytest.mark.parametrize(
    ("case", "p", "signals", "expected"),
    [
        ("SLO miss scales out in proportion", pool(replicas=2), {"ttft_attainment": 0.6}, (3, "SLOMiss")),
        ("a deep SLO miss at most doubles", pool(replicas=2), {"ttft_attainment": 0.1}, (4, "SLOMiss")),
        ("SLO miss at max holds", pool(replicas=8), {"ttft_attainment": 0.5}, (8, "AtMax")),
        ("scale-out is capped at max", pool(replicas=6), {"ttft_attainment": 0.1}, (8, "SLOMiss")),
        ("KV pressure scales out", pool(kv_usage=0.95), {"ttft_attainment": 0.99}, (3, "KVPressure")),
        (
            "low KV + good SLO scales in by one",
            pool(replicas=5, kv_usage=0.1),
            {"ttft_attainment": 0.99},
            (4, "LowUtilization"),
        ),
        ("no traffic + low KV scales in by one", pool(replicas=5, kv_usage=0.0), {}, (4, "LowUtilization")),
        (
            "scale-in waits for the cool-down",
            pool(replicas=5, kv_usage=0.1, seconds_since_last_change=10),
            {"ttft_attainment": 0.99},
            (5, "Cooldown"),
        ),
        ("scale-in stops at min", pool(replicas=1, kv_usage=0.1), {"ttft_attainment": 0.99}, (1, "AtMin")),
        ("within targets holds", pool(kv_usage=0.5), {"ttft_attainment": 0.95}, (2, "Steady")),
        ("no metrics holds", pool(kv_usage=0.99), {"metrics_available": False}, (2, "NoMetrics")),
        ("out of bounds is clamped", pool(replicas=12), {}, (8, "Bounds")),
        (
            "decode follows TPOT, not TTFT",
            pool(role="decode"),
            {"ttft_attainment": 0.1, "tpot_attainment": 0.95},
            (2, "Steady"),
        ),
        ("decode scales out on a TPOT miss", pool(role="decode"), {"tpot_attainment": 0.5}, (4, "SLOMiss")),
        (
            "a fixed pool never moves",
            pool(autoscaled=False, kv_usage=0.99),
            {"ttft_attainment": 0.1},
            (2, "Fixed"),
        ),
        (
            "scale from zero on demand",
            pool(replicas=0, min_replicas=0),
            {"ttft_attainment": 0.2},
            (1, "SLOMiss"),
        ),
    ],
)
def test_decision_table(case: str, p: PoolInput, signals: dict[str, Any], expected: tuple[int, str]) -> None:
    """Each rule of the autoscaler, one row each (see switchyard.operator.autoscaling.decision)."""
    assert one(p, **signals) == expected, case


def test_scale_in_is_gradual_over_repeated_ticks() -> None:
    """Idle pools shrink one replica per decision (and per cool-down), never straight to min."""
    p = pool(replicas=6, kv_usage=0.05)
    seen = []
    for _ in range(7):
        (d,) = decide([p], ServiceSignals(ttft_attainment=1.0))
        seen.append(d.desired)
        p = PoolInput(**{**{f: getattr(p, f) for f in p.__dataclass_fields__}, "replicas": d.desired})
    assert seen == [5, 4, 3, 2, 1, 1, 1]


def test_prefill_scale_out_pulls_decode_along_to_keep_the_band() -> None:
    """P:D must stay within [0.5, 2]: prefill growing to 6 against 2 decode raises decode to 3."""
    pools = [pool("pre", "prefill", 3), pool("dec", "decode", 2, kv_usage=0.5)]
    signals = ServiceSignals(ttft_attainment=0.45, tpot_attainment=0.99, ratio_min=0.5, ratio_max=2.0)
    pre, dec = decide(pools, signals)
    assert (pre.desired, pre.reason) == (6, "SLOMiss")
    assert (dec.desired, dec.reason) == (3, "RatioBand")
    assert pre.desired / dec.desired <= 2.0


def test_decode_scale_in_that_would_break_the_band_is_undone() -> None:
    """Decode would shrink (low KV) but prefill:decode would exceed the band: decode stays."""
    pools = [pool("pre", "prefill", 4, kv_usage=0.5), pool("dec", "decode", 2, kv_usage=0.05)]
    pre, dec = decide(pools, ServiceSignals(ttft_attainment=0.95, tpot_attainment=0.99, ratio_max=2.0))
    assert (pre.desired, dec.desired, dec.reason) == (4, 2, "RatioBand")


def test_band_lowers_the_long_side_when_the_short_side_is_at_max() -> None:
    pools = [pool("pre", "prefill", 8, kv_usage=0.5), pool("dec", "decode", 2, max_replicas=2, kv_usage=0.5)]
    pre, dec = decide(pools, ServiceSignals(ttft_attainment=0.95, tpot_attainment=0.95, ratio_max=2.0))
    assert (pre.desired, pre.reason, dec.desired) == (4, "RatioBand", 2)


def test_band_raises_prefill_when_decode_outgrows_it() -> None:
    pools = [pool("pre", "prefill", 1, kv_usage=0.5), pool("dec", "decode", 4, kv_usage=0.5)]
    pre, dec = decide(pools, ServiceSignals(ttft_attainment=0.95, tpot_attainment=0.95, ratio_min=0.5))
    assert (pre.desired, pre.reason, dec.desired) == (2, "RatioBand", 4)


def test_bounds_hold_under_every_signal() -> None:
    """Whatever the signals, every decision lies within [min, max]."""
    for replicas in range(0, 10):
        for att in (None, 0.0, 0.5, 0.95):
            for kv in (None, 0.0, 0.5, 0.99):
                p = pool(replicas=replicas, min_replicas=1, max_replicas=6, kv_usage=kv)
                desired, _ = one(p, ttft_attainment=att)
                assert 1 <= desired <= 6


METRICS = """\
# TYPE switchyard_request_ttft_seconds histogram
switchyard_request_ttft_seconds_bucket{le="0.5",model="m",policy="dualmap"} 60.0
switchyard_request_ttft_seconds_bucket{le="1.0",model="m",policy="dualmap"} 80.0
switchyard_request_ttft_seconds_bucket{le="+Inf",model="m",policy="dualmap"} 100.0
switchyard_request_ttft_seconds_count{model="m",policy="dualmap"} 100.0
switchyard_request_ttft_seconds_sum{model="m",policy="dualmap"} 70.0
# TYPE switchyard_instance_kv_usage_ratio gauge
switchyard_instance_kv_usage_ratio{instance_id="llama-pd-prefill-0"} 0.9
switchyard_instance_kv_usage_ratio{instance_id="llama-pd-prefill-1"} 0.8
switchyard_instance_kv_usage_ratio{instance_id="llama-pd-decode-0"} 0.1
# TYPE switchyard_instance_running_requests gauge
switchyard_instance_running_requests{instance_id="llama-pd-prefill-1"} 3.0
switchyard_instance_running_requests{instance_id="llama-pd-prefill-11"} 1.0
"""


def test_attainment_from_histogram_buckets() -> None:
    """Fraction of requests with TTFT <= SLO: exact on a bucket bound, interpolated inside one,
    over the interval since the previous scrape, None without traffic."""
    snap = parse_router_metrics(METRICS)
    assert attainment(snap.ttft_buckets, 1.0) == (0.8, 100.0)
    assert attainment(snap.ttft_buckets, 0.75)[0] == pytest.approx(0.7)
    assert attainment(snap.ttft_buckets, 100.0)[0] == pytest.approx(0.8)
    before = {0.5: 50.0, 1.0: 60.0, math.inf: 60.0}
    assert attainment(snap.ttft_buckets, 0.5, before=before) == (0.25, 40.0)
    assert attainment(snap.ttft_buckets, 0.5, before=snap.ttft_buckets) == (None, 0.0)
    restarted = {0.5: 500.0, 1.0: 600.0, math.inf: 600.0}  # counts went down: use cumulative
    assert attainment(snap.ttft_buckets, 0.5, before=restarted)[0] == pytest.approx(0.6)
    assert snap.pool_kv_usage("llama-pd-prefill") == pytest.approx(0.85)
    assert snap.pool_kv_usage("nothing") is None


def test_drain_client_reads_the_instance_pinned_to_the_pod() -> None:
    """Instance <pool>-<i> runs on pod <pool>-worker-<i>; other ordinals never count."""
    metrics = FakeMetrics()
    metrics.bodies["http://router:8000/metrics"] = METRICS
    drain = MetricsDrainClient(metrics)
    assert drain.running_requests("http://router:8000", "llama-pd-prefill-worker-1") == 3
    assert drain.running_requests("http://router:8000", "llama-pd-prefill-worker-0") is None


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch, in place (None deletes a key)."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class RecordingKube:
    """Objects by (kind, name) with merge-patch semantics, and a log of every patch."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in objects}
        self.patches: list[tuple[str, str, dict[str, Any], str | None]] = []

    def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, name))
        return copy.deepcopy(obj) if obj is not None else None

    def patch(
        self, kind: str, ns: str, name: str, body: dict[str, Any], *, subresource: str | None = None
    ) -> Any:
        self.patches.append((kind, name, copy.deepcopy(body), subresource))
        obj = self.objects[kind, name]
        merge(obj, {k: v for k, v in body.items() if k != "metadata"})
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        return obj


def tick_fixture() -> tuple[dict[str, Any], dict[Any, Any], RecordingKube]:
    """The P/D example's service and pools as the timer sees them (index entries) and as the API
    holds them (a recording fake)."""
    docs = {d["metadata"]["name"]: d for d in load_examples("llmservice-pd.yaml", "default")}
    for doc in docs.values():
        doc["metadata"].update(uid=doc["metadata"]["name"], resourceVersion="1")
        doc["status"] = {}
    index = {
        ("default", "llama-pd"): [
            {"name": n, "spec": docs[n]["spec"], "deleting": False, "status": {},
             "body": {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ServingPool",
                      "metadata": {"name": n, "namespace": "default", "uid": n}}}
            for n in ("llama-pd-prefill", "llama-pd-decode")
        ]
    }  # fmt: skip
    kube = RecordingKube(*(docs[n] for n in ("llama-pd", "llama-pd-prefill", "llama-pd-decode")))
    return docs["llama-pd"], index, kube


def test_timer_tick_writes_status_spec_replicas_and_events() -> None:
    """One tick: scrape the router Service, write sloAttainment/kvUsage and MetricsAvailable,
    decide, patch the pool's spec.replicas and record the decision in its status and as Events;
    a tick with the router gone clears the numbers and holds, and a repeat of it writes nothing."""
    service, index, kube = tick_fixture()
    metrics, events = FakeMetrics(), []
    metrics.bodies["http://llama-pd-router.default.svc:8000/metrics"] = METRICS
    # An earlier tick saw an idle router (the first scrape is only a baseline).
    memo = {"kube": kube, "metrics": metrics, "scrapes": {("default", "llama-pd"): RouterSnapshot()},
            "options": fast_options()}  # fmt: skip

    def post(obj: Any, *, reason: str, message: str) -> None:
        events.append((obj["metadata"]["name"], reason, message))

    log = logging.getLogger("test")
    decisions = run_autoscaler(service, memo=memo, index=index, logger=log, post=post)
    # TTFT SLO 1 s -> 80 % attained < 90 %: prefill grows 2 -> 3; decode KV 0.1 < 0.4: shrinks
    # 2 -> 1, within the P:D band [0.5, 2] (3:1 would break it, so decode stays at 2).
    assert [(d.pool, d.desired, d.reason) for d in decisions] == [
        ("llama-pd-prefill", 3, "SLOMiss"),
        ("llama-pd-decode", 2, "RatioBand"),
    ]
    status = {name: obj.get("status", {}) for (_, name), obj in kube.objects.items()}
    assert status["llama-pd"]["sloAttainment"] == 0.8
    assert (status["llama-pd-prefill"]["sloAttainment"], status["llama-pd-prefill"]["kvUsage"]) == (0.8, 0.85)
    assert "sloAttainment" not in status["llama-pd-decode"]  # decode follows TPOT: no TPOT traffic
    assert status["llama-pd-decode"]["kvUsage"] == 0.1
    for name in ("llama-pd", "llama-pd-prefill", "llama-pd-decode"):
        (cond,) = status[name]["conditions"]
        assert (cond["type"], cond["status"], cond["reason"]) == ("MetricsAvailable", "True", "Scraped")
    observed = [p for p in kube.patches if "conditions" in p[2].get("status", {})]
    assert all(p[3] == "status" and p[2]["metadata"]["resourceVersion"] == "1" for p in observed)
    spec_patches = [p for p in kube.patches if "spec" in p[2]]
    assert spec_patches == [("ServingPool", "llama-pd-prefill", {"spec": {"replicas": 3}}, None)]
    record = status["llama-pd-prefill"]["lastScaleDecision"]
    assert (record["fromReplicas"], record["toReplicas"], record["reason"]) == (2, 3, "SLOMiss")
    assert [(name, reason) for name, reason, _ in events] == [
        ("llama-pd-prefill", "ScaleOut"),
        ("llama-pd", "ScaleOut"),
    ]

    kube.patches.clear()
    metrics.bodies.clear()  # router unreachable: hold, clear the numbers, say why
    service["status"] = kube.get("LLMService", "default", "llama-pd")["status"]  # type: ignore[index]
    decisions = run_autoscaler(service, memo=memo, index=index, logger=log, post=post)
    assert {d.reason for d in decisions} == {"NoMetrics"}
    assert not [p for p in kube.patches if "spec" in p[2]]
    for (_, name), obj in kube.objects.items():
        assert "sloAttainment" not in obj["status"] and "kvUsage" not in obj["status"], name
        (cond,) = obj["status"]["conditions"]
        assert (cond["status"], cond["reason"]) == ("False", "RouterUnreachable")
        assert "connection refused" in cond["message"]

    for entry in index["default", "llama-pd"]:  # the index has caught up: nothing left to write
        entry["status"] = kube.objects["ServingPool", entry["name"]]["status"]
    service["status"] = kube.objects["LLMService", "llama-pd"]["status"]
    kube.patches.clear()
    run_autoscaler(service, memo=memo, index=index, logger=log, post=post)
    assert kube.patches == []


def test_first_tick_is_a_baseline_and_never_scales_on_router_history() -> None:
    """A (re)started operator's first scrape holds the router's lifetime counts: no SLO decision
    from them (KV usage, a gauge, still counts), and the condition says Baseline."""
    service, index, kube = tick_fixture()
    metrics = FakeMetrics()
    metrics.bodies["http://llama-pd-router.default.svc:8000/metrics"] = METRICS
    memo = {"kube": kube, "metrics": metrics, "scrapes": {}, "options": fast_options()}
    decisions = run_autoscaler(
        service, memo=memo, index=index, logger=logging.getLogger("test"), post=lambda *a, **k: None
    )
    assert "SLOMiss" not in {d.reason for d in decisions}
    assert (decisions[0].pool, decisions[0].reason) == ("llama-pd-prefill", "KVPressure")  # 0.85 > 0.8
    status = kube.objects["LLMService", "llama-pd"]["status"]
    assert "sloAttainment" not in status and status["conditions"][0]["reason"] == "Baseline"


def test_status_write_keeps_the_reconciles_conditions_and_yields_on_conflict() -> None:
    """The timer's MetricsAvailable joins Ready/Progressing/Degraded without touching them, and a
    409 (the object changed since it was read) skips the write instead of failing the tick."""
    _, _, kube = tick_fixture()
    ready = {"type": "Ready", "status": "True", "reason": "Available", "message": "2/2",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    kube.objects["ServingPool", "llama-pd-prefill"]["status"] = {"conditions": [ready]}
    cond = Condition("MetricsAvailable", "True", "NoTraffic", "no requests")
    fields = {"sloAttainment": None, "kvUsage": 0.5}
    assert write_observed_status(
        kube, "ServingPool", "default", "llama-pd-prefill", fields, cond, known_status=None
    )
    written = kube.objects["ServingPool", "llama-pd-prefill"]["status"]
    assert [c["type"] for c in written["conditions"]] == ["Ready", "MetricsAvailable"]
    assert written["conditions"][0] == ready and written["kvUsage"] == 0.5
    assert not write_observed_status(
        kube, "ServingPool", "default", "llama-pd-prefill", fields, cond, known_status=written
    )

    class Conflicting(RecordingKube):
        def patch(self, *args: Any, **kwargs: Any) -> Any:
            raise ApiError(409, "the object has been modified")

    conflicting = Conflicting(*kube.objects.values())
    fields["kvUsage"] = 0.7
    assert not write_observed_status(
        conflicting, "ServingPool", "default", "llama-pd-prefill", fields, cond, known_status=None
    )
