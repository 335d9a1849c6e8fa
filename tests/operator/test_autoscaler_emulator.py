"""The autoscaler end to end: the real Kopf operator against kmock's emulator, reading a real
Prometheus endpoint over HTTP.

The router's side is a tiny HTTP server (``prometheus_client``'s own, the exposition code the
router's ``/metrics`` uses too) publishing the router's series under the router's names and
labels, scripted by the test. The operator reads it with its real ``HttpMetricsSource``, pointed
at it through the ``router_url`` option, and ticks every 0.3 s (``autoscale_interval_s``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from switchyard import metrics as router_metrics_module
from switchyard.operator.router_metrics import (
    KV_USAGE_METRIC,
    TPOT_METRIC,
    TTFT_METRIC,
    HttpMetricsSource,
)
from tests.helpers.waiting import eventually
from tests.operator.emulator import K8sEmulator
from tests.operator.harness import Api, OperatorRunner, condition, fast_options, load_examples, objects_of

pytestmark = pytest.mark.timeout(90)
NS = "default"
GROUP_VERSION = "switchyard.dev/v1alpha1"
INTERVAL_S = 0.3


class RouterMetricsServer:
    """The router's metrics as it exposes them (names, labels, SLO bucket bounds), on port 0."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            TTFT_METRIC, "ttft", ["model", "policy"], buckets=(0.5, 1.0, 5.0), registry=self.registry
        )
        self.tpot = Histogram(
            TPOT_METRIC, "tpot", ["model", "policy"], buckets=(0.05, 0.1), registry=self.registry
        )
        self.kv = Gauge(KV_USAGE_METRIC, "kv", ["instance_id"], registry=self.registry)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.port = int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class CountingSource(HttpMetricsSource):
    """The operator's real HTTP source, counting its scrapes and their failures."""

    def __init__(self) -> None:
        super().__init__(timeout_s=2.0)
        self.scrapes = self.failures = 0

    def scrape(self, url: str) -> str:
        self.scrapes += 1
        try:
            return super().scrape(url)
        except OSError:
            self.failures += 1
            raise


def test_the_scripted_series_are_the_routers_own() -> None:
    """The names and labels the test server publishes are the ones the router declares."""
    declared = {m.name for m in router_metrics_module.REGISTRY.collect()}
    for name in (TTFT_METRIC, TPOT_METRIC, KV_USAGE_METRIC):
        assert name in declared
    assert router_metrics_module.REQUEST_TTFT._labelnames == ("model", "policy")
    assert router_metrics_module.INSTANCE_KV_USAGE._labelnames == ("instance_id",)


def get(emu: K8sEmulator, plural: str, name: str) -> dict[str, Any]:
    """The stored object (``{}`` while absent); read on the emulator's own loop, no HTTP."""
    resource = f"{GROUP_VERSION}/{plural}" if "/" not in plural else plural
    for obj in objects_of(emu, resource):
        if obj["metadata"]["name"] == name:
            return obj
    return {}


def status(emu: K8sEmulator, plural: str, name: str) -> dict[str, Any]:
    return dict(get(emu, plural, name).get("status") or {})


def scale_events(emu: K8sEmulator) -> set[tuple[str, str]]:
    return {
        (e["involvedObject"]["name"], e["reason"])
        for e in objects_of(emu, "v1/events")
        if e.get("reason") in {"ScaleOut", "ScaleIn"}
    }


async def test_autoscaler_scales_from_router_metrics_and_reports_them(
    api: Api, operator: OperatorRunner, k8s: K8sEmulator
) -> None:
    """After a baseline scrape, TTFT misses its 1 s objective on every request: the prefill pool's
    spec.replicas goes 2 -> 4 (the P:D band [0.5, 2] allows it), its StatefulSet follows, the
    decision is in its status and in Events on the pool and the service, and the service and
    pools show sloAttainment, kvUsage and MetricsAvailable. Without new requests nothing moves
    and the last attainment stays. When the router goes away, the values are cleared, the
    condition says RouterUnreachable, replicas hold, and it is still one scrape per tick; when
    the service is deleted its daemon stops scraping."""
    router = RouterMetricsServer()
    try:
        for pool in ("prefill", "decode"):
            for i in range(2):
                router.kv.labels(f"llama-pd-{pool}-{i}").set(0.5)  # between scale-in and target
        source = CountingSource()
        options = fast_options(autoscale_interval_s=INTERVAL_S, router_url=f"http://127.0.0.1:{router.port}")
        await operator.start(options, metrics=source)
        await api(api.kube.create, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                    "metadata": {"name": "llama-3-1-8b", "namespace": NS}})  # fmt: skip
        for doc in load_examples("llmservice-pd.yaml", NS):
            await api(api.kube.create, doc)

        # The first scrape is a baseline; the requests after it are what the next tick measures.
        await eventually(
            lambda: (
                condition(get(k8s, "llmservices", "llama-pd"), "MetricsAvailable").get("reason") == "Baseline"
            ),
            20,
        )
        assert get(k8s, "servingpools", "llama-pd-prefill")["spec"]["replicas"] == 2
        for _ in range(10):
            router.ttft.labels("llama-3.1-8b-instruct", "dualmap").observe(3.0)  # objective 1 s: missed
            router.tpot.labels("llama-3.1-8b-instruct", "dualmap").observe(0.02)  # objective 50 ms: met

        # Scale-out, recorded in spec, status, the StatefulSet and Events.
        await eventually(lambda: get(k8s, "servingpools", "llama-pd-prefill")["spec"]["replicas"] == 4, 20)
        await eventually(lambda: "lastScaleDecision" in status(k8s, "servingpools", "llama-pd-prefill"), 20)
        record = status(k8s, "servingpools", "llama-pd-prefill")["lastScaleDecision"]
        assert (record["fromReplicas"], record["toReplicas"], record["reason"]) == (2, 4, "SLOMiss")
        assert status(k8s, "servingpools", "llama-pd-prefill")["desiredReplicas"] == 4
        await eventually(
            lambda: get(k8s, "apps/v1/statefulsets", "llama-pd-prefill-worker")["spec"]["replicas"] == 4, 20
        )
        await eventually(
            lambda: {("llama-pd-prefill", "ScaleOut"), ("llama-pd", "ScaleOut")} <= scale_events(k8s), 20
        )
        assert get(k8s, "servingpools", "llama-pd-decode")["spec"]["replicas"] == 2

        # What the router reported, on the service and both pools. Eventually: a reconcile that
        # read the object before the timer's write may drop the condition; the next tick restores it.
        def reported() -> bool:
            svc = status(k8s, "llmservices", "llama-pd")
            prefill, decode = (status(k8s, "servingpools", f"llama-pd-{r}") for r in ("prefill", "decode"))
            return (
                svc.get("sloAttainment") == 0.0  # the lower of TTFT (0) and TPOT (1)
                and (prefill.get("sloAttainment"), prefill.get("kvUsage")) == (0.0, 0.5)
                and (decode.get("sloAttainment"), decode.get("kvUsage")) == (1.0, 0.5)
                and all(
                    condition({"status": st}, "MetricsAvailable").get("status") == "True"
                    for st in (svc, prefill, decode)
                )
            )

        try:
            await eventually(reported, 20)
        except AssertionError:
            for plural, name in (
                ("llmservices", "llama-pd"),
                ("servingpools", "llama-pd-prefill"),
                ("servingpools", "llama-pd-decode"),
            ):
                print(name, status(k8s, plural, name))
            raise

        # No new requests: three more ticks change nothing but the condition's reason.
        seen = source.scrapes
        await eventually(lambda: source.scrapes >= seen + 3, 20)
        await eventually(
            lambda: (
                condition(get(k8s, "llmservices", "llama-pd"), "MetricsAvailable").get("reason")
                == "NoTraffic"
            ),
            20,
        )
        assert get(k8s, "servingpools", "llama-pd-prefill")["spec"]["replicas"] == 4
        assert status(k8s, "servingpools", "llama-pd-prefill")["sloAttainment"] == 0.0
        assert condition(get(k8s, "servingpools", "llama-pd-prefill"), "Ready")  # the reconcile's stay
    finally:
        router.stop()

    # The router goes away: a condition, cleared numbers, held replicas, no retry storm.
    def unreachable(plural: str, name: str) -> bool:
        obj = get(k8s, plural, name)
        cond = condition(obj, "MetricsAvailable")
        st = obj.get("status") or {}
        return cond.get("reason") == "RouterUnreachable" and "sloAttainment" not in st and "kvUsage" not in st

    await eventually(lambda: unreachable("llmservices", "llama-pd"), 20)
    await eventually(lambda: unreachable("servingpools", "llama-pd-prefill"), 20)
    await eventually(lambda: unreachable("servingpools", "llama-pd-decode"), 20)
    failures, loop = source.failures, asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(10 * INTERVAL_S)
    elapsed = loop.time() - started
    assert source.failures - failures <= elapsed / INTERVAL_S + 1, "more than one scrape per tick"
    assert [get(k8s, "servingpools", f"llama-pd-{r}")["spec"]["replicas"] for r in ("prefill", "decode")] == [
        4,
        2,
    ]
    assert condition(get(k8s, "llmservices", "llama-pd"), "MetricsAvailable")["status"] == "False"

    # Deleting the service stops its daemon.
    await api(api.kube.delete, "LLMService", NS, "llama-pd")
    await eventually(lambda: not get(k8s, "llmservices", "llama-pd"), 20)
    scrapes = source.scrapes
    await asyncio.sleep(5 * INTERVAL_S)
    assert source.scrapes <= scrapes + 1  # at most a tick already in flight
