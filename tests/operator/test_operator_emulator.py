"""The operator end to end: real Kopf and Switchyard's handlers against kmock's Kubernetes emulator.

The emulator has no controllers and no garbage collector: no pods appear for a StatefulSet and
nothing becomes ready unless a test writes it, and deleting an owner leaves its children unless
the operator deletes them (which it does, explicitly). See tests/operator/harness.py.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from tests.helpers.waiting import eventually
from tests.operator.emulator import K8sEmulator
from tests.operator.harness import (
    Api,
    OperatorRunner,
    condition,
    fast_options,
    load_examples,
    writes,
)

pytestmark = pytest.mark.timeout(60)
NS = "default"
PD_CHILDREN = [
    ("ConfigMap", "llama-pd-config"),
    ("Deployment", "llama-pd-ray-head"),
    ("Service", "llama-pd-ray-head"),
    ("Deployment", "llama-pd-router"),
    ("Service", "llama-pd-router"),
    ("Service", "llama-pd-router-grpc"),
]
POOL_CHILDREN = [
    ("StatefulSet", "llama-pd-prefill-worker"),
    ("Service", "llama-pd-prefill-worker"),
    ("StatefulSet", "llama-pd-decode-worker"),
    ("Service", "llama-pd-decode-worker"),
    ("StatefulSet", "llama-pd-kv-kvcache"),
    ("Service", "llama-pd-kv-kvcache"),
]


def pvc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NS}}


async def wait_for(
    api: Api, kind: str, name: str, check: Any = bool, within_s: float = 15.0
) -> dict[str, Any]:
    """Poll until the object exists and ``check(obj)`` holds; return it."""
    found: dict[str, Any] = {}

    async def probe() -> bool:
        obj = await api(api.kube.get, kind, NS, name)
        if obj is not None and check(obj):
            found.update(obj)
            return True
        return False

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await probe():
        if loop.time() > deadline:
            last = await api(api.kube.get, kind, NS, name)
            raise AssertionError(f"{kind} {name} not as expected within {within_s}s; last seen: {last}")
        await asyncio.sleep(0.1)
    return found


async def wait_gone(api: Api, kind: str, name: str, within_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while await api(api.kube.get, kind, NS, name) is not None:
        assert loop.time() < deadline, f"{kind} {name} still exists after {within_s}s"
        await asyncio.sleep(0.1)


def has_condition(kind: str, status: str, reason: str | None = None) -> Any:
    def check(obj: dict[str, Any]) -> bool:
        cond = condition(obj, kind)
        return cond.get("status") == status and (reason is None or cond.get("reason") == reason)

    return check


async def create_pd_stack(api: Api, only: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The P/D example's objects (service, two pools, KV cache; ``only`` those named) plus the
    model PVC they need."""
    await api(api.kube.create, pvc("llama-3-1-8b"))
    created = {}
    for doc in load_examples("llmservice-pd.yaml", NS):
        if not only or doc["metadata"]["name"] in only:
            created[doc["metadata"]["name"]] = await api(api.kube.create, doc)
    return created


async def wait_converged(api: Api) -> None:
    for kind, name in PD_CHILDREN + POOL_CHILDREN:
        await wait_for(api, kind, name)
    for kind, name in [
        ("LLMService", "llama-pd"),
        ("ServingPool", "llama-pd-prefill"),
        ("ServingPool", "llama-pd-decode"),
        ("KVCachePool", "llama-pd-kv"),  # without it, a stop right after could precede its status
    ]:
        await wait_for(
            api, kind, name, lambda o: (o.get("status") or {}).get("observedGeneration") is not None
        )


async def test_pd_service_renders_owned_children_and_tracks_readiness(
    api: Api, operator: OperatorRunner
) -> None:
    """The P/D example yields the Ray head, router, config, worker and cache children, each owned
    by the object it belongs to; pools report the scale selector, and turn Ready when their
    StatefulSet reports its pods ready (no spec change needed)."""
    await operator.start()
    created = await create_pd_stack(api)
    await wait_converged(api)
    owner_of = {
        "llama-pd": [n for _, n in PD_CHILDREN],
        "llama-pd-prefill": ["llama-pd-prefill-worker"],
        "llama-pd-decode": ["llama-pd-decode-worker"],
        "llama-pd-kv": ["llama-pd-kv-kvcache"],
    }
    for kind, name in PD_CHILDREN + POOL_CHILDREN:
        obj = await api(api.kube.get, kind, NS, name)
        (ref,) = obj["metadata"]["ownerReferences"]
        owner = next(o for o, names in owner_of.items() if name in names)
        assert ref["uid"] == created[owner]["metadata"]["uid"], f"{kind} {name}"
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "switchyard-operator"
    config = (await api(api.kube.get, "ConfigMap", NS, "llama-pd-config"))["data"]["serve.json"]
    assert '"name": "llama-pd-prefill"' in config and '"name": "llama-pd-decode"' in config
    assert (await api(api.kube.get, "StatefulSet", NS, "llama-pd-decode-worker"))["spec"]["replicas"] == 2
    pool = await wait_for(
        api, "ServingPool", "llama-pd-decode", has_condition("Progressing", "True", "PodsPending")
    )
    assert pool["status"]["selector"] == (
        "app.kubernetes.io/component=worker,switchyard.dev/pool=llama-pd-decode,switchyard.dev/service=llama-pd"
    )
    service = await api(api.kube.get, "LLMService", NS, "llama-pd")
    assert service["status"]["endpoints"][0] == "http://llama-pd-router.default.svc:8000"

    await api(api.kube.patch, "StatefulSet", NS, "llama-pd-decode-worker", {"status": {"readyReplicas": 2}})
    pool = await wait_for(api, "ServingPool", "llama-pd-decode", has_condition("Ready", "True", "Available"))
    assert pool["status"]["readyReplicas"] == 2
    assert condition(pool, "Degraded")["status"] == "False"


async def test_pool_replica_changes_reach_the_statefulset_and_scale_in_drains_first(
    api: Api, operator: OperatorRunner
) -> None:
    """Scale-out applies at once (and reaches the router's config); scale-in marks the leaving
    pods draining and holds the old replica count until the drain client reports them idle."""
    await operator.start()
    await create_pd_stack(api, only=("llama-pd", "llama-pd-prefill"))
    await wait_for(api, "StatefulSet", "llama-pd-prefill-worker")
    await api(api.kube.patch, "ServingPool", NS, "llama-pd-prefill", {"spec": {"replicas": 3}})
    await wait_for(api, "StatefulSet", "llama-pd-prefill-worker", lambda o: o["spec"]["replicas"] == 3)
    pool = await wait_for(
        api, "ServingPool", "llama-pd-prefill", lambda o: o["status"].get("observedGeneration") == 2
    )
    assert pool["status"]["replicas"] == 3
    await wait_for(api, "ConfigMap", "llama-pd-config", lambda o: '"instances": 3' in o["data"]["serve.json"])

    labels = {"switchyard.dev/service": "llama-pd", "switchyard.dev/pool": "llama-pd-prefill"}
    for i in range(3):  # the emulator has no StatefulSet controller: the test plays it
        meta = {"name": f"llama-pd-prefill-worker-{i}", "namespace": NS, "labels": labels}
        await api(api.kube.create, {"apiVersion": "v1", "kind": "Pod", "metadata": meta})
    operator.drain.running["llama-pd-prefill-worker-1"] = 3
    operator.drain.running["llama-pd-prefill-worker-2"] = 0
    await api(api.kube.patch, "ServingPool", NS, "llama-pd-prefill", {"spec": {"replicas": 1}})
    await wait_for(api, "ServingPool", "llama-pd-prefill", has_condition("Progressing", "True", "Draining"))
    for i in (1, 2):
        pod = await api(api.kube.get, "Pod", NS, f"llama-pd-prefill-worker-{i}")
        assert pod["metadata"]["annotations"]["switchyard.dev/draining"] == "true"
    pod0 = await api(api.kube.get, "Pod", NS, "llama-pd-prefill-worker-0")
    assert "switchyard.dev/draining" not in (pod0["metadata"].get("annotations") or {})
    assert (await api(api.kube.get, "StatefulSet", NS, "llama-pd-prefill-worker"))["spec"]["replicas"] == 3

    operator.drain.running["llama-pd-prefill-worker-1"] = 0  # its last request finished
    await wait_for(api, "StatefulSet", "llama-pd-prefill-worker", lambda o: o["spec"]["replicas"] == 1)
    await wait_for(
        api, "ServingPool", "llama-pd-prefill", has_condition("Progressing", "True", "PodsPending")
    )


async def test_deleting_the_service_removes_what_the_operator_owns(
    api: Api, operator: OperatorRunner
) -> None:
    """Deleting the LLMService deletes its children explicitly (the emulator has no garbage
    collector); its pool stays and reports ServiceNotFound; deleting the pool removes its workers."""
    await operator.start()
    for doc in load_examples("llmservice-unified.yaml", NS):  # an hf:// model: no PVC needed
        await api(api.kube.create, doc)
    names = [("ConfigMap", "qwen-small-config"), ("Deployment", "qwen-small-router"),
             ("Service", "qwen-small-router"), ("Service", "qwen-small-router-grpc"),
             ("Deployment", "qwen-small-ray-head"), ("Service", "qwen-small-ray-head")]  # fmt: skip
    for kind, name in names:
        await wait_for(api, kind, name)
    sts = await wait_for(api, "StatefulSet", "qwen-small-unified-worker")
    (fetch,) = sts["spec"]["template"]["spec"]["initContainers"]
    assert fetch["command"][-2:] == ["Qwen/Qwen2.5-0.5B-Instruct", "/models"]

    await api(api.kube.delete, "LLMService", NS, "qwen-small")
    await wait_gone(api, "LLMService", "qwen-small")  # the finalizer held it until cleanup finished
    for kind, name in names:
        assert await api(api.kube.get, kind, NS, name) is None, f"{kind} {name} left behind"
    await wait_for(
        api, "ServingPool", "qwen-small-unified", has_condition("Degraded", "True", "ServiceNotFound")
    )
    await api(api.kube.delete, "ServingPool", NS, "qwen-small-unified")
    await wait_gone(api, "ServingPool", "qwen-small-unified")
    assert await api(api.kube.get, "StatefulSet", NS, "qwen-small-unified-worker") is None
    assert await api(api.kube.get, "Service", NS, "qwen-small-unified-worker") is None


async def test_restarted_operator_converges_without_writing(
    api: Api, operator: OperatorRunner, k8s: K8sEmulator
) -> None:
    """A second operator process finds everything in place: its resume handlers read, compare
    and write nothing (no POST, PATCH, PUT or DELETE reaches the API)."""
    await operator.start()
    await create_pd_stack(api)
    await wait_converged(api)
    await operator.stop()
    assert writes(k8s), "the first operator wrote the children"
    mark = len(k8s._requests)
    await operator.start()

    def reads(fragment: str) -> int:
        return sum(fragment in str(r.url) for r in list(k8s._requests)[mark:] if r.method.value == "GET")

    # Each resume handler GETs the children it renders; the last of them ends the handlers' work.
    for child in (
        "llama-pd-router-grpc",
        "llama-pd-kv-kvcache",
        "llama-pd-prefill-worker",
        "llama-pd-decode-worker",
    ):
        await eventually(functools.partial(lambda c: reads(f"services/{c}") >= 1, child), 15)
    await asyncio.sleep(0.5)
    assert [f"{r.method.value} {r.url.path}" for r in writes(k8s, mark)] == []


async def test_pool_waits_for_its_service_and_converges_when_it_appears(
    api: Api, operator: OperatorRunner
) -> None:
    """A pool whose serviceRef does not exist is Degraded/ServiceNotFound (retried slowly); the
    service's own reconcile converges it as soon as the service is created."""
    await operator.start(fast_options(service_wait_s=(30.0,)))
    docs = {d["metadata"]["name"]: d for d in load_examples("llmservice-pd.yaml", NS)}
    await api(api.kube.create, docs["llama-pd-decode"])
    pool = await wait_for(
        api, "ServingPool", "llama-pd-decode", has_condition("Degraded", "True", "ServiceNotFound")
    )
    assert "'llama-pd' does not exist" in condition(pool, "Degraded")["message"]
    await api(api.kube.create, pvc("llama-3-1-8b"))
    await api(api.kube.create, docs["llama-pd"])
    await wait_for(api, "StatefulSet", "llama-pd-decode-worker", within_s=10)  # well before the 30 s retry
    await wait_for(api, "ServingPool", "llama-pd-decode", has_condition("Degraded", "False"))


async def test_unusable_model_source_degrades_the_service(api: Api, operator: OperatorRunner) -> None:
    """A model the pods could not load is reported with a precise reason and nothing is rendered;
    a missing claim is retried, so creating it converges the service."""
    await operator.start()
    for name, model in [
        ("s3-model", {"uri": "s3://models/llama"}),
        ("no-claim", {"pvc": {"claimName": "later"}}),
    ]:
        svc = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "LLMService",
               "metadata": {"name": name, "namespace": NS}, "spec": {"model": model}}  # fmt: skip
        await api(api.kube.create, svc)
    obj = await wait_for(
        api, "LLMService", "s3-model", has_condition("Degraded", "True", "UnsupportedModelURI")
    )
    assert "'s3' has no fetcher (supported: hf://)" in condition(obj, "Degraded")["message"]
    obj = await wait_for(api, "LLMService", "no-claim", has_condition("Degraded", "True", "ModelPVCNotFound"))
    assert "'later'" in condition(obj, "Degraded")["message"] and condition(obj, "Ready")["status"] == "False"
    for name in ("s3-model", "no-claim"):
        assert await api(api.kube.get, "Deployment", NS, f"{name}-router") is None
    await api(api.kube.create, pvc("later"))
    await wait_for(api, "Deployment", "no-claim-router")
    await wait_for(api, "LLMService", "no-claim", has_condition("Degraded", "False"))


async def test_invalid_spec_is_degraded_permanently_until_fixed(api: Api, operator: OperatorRunner) -> None:
    """A spec the schema let through but the model rejects (minReplicas > maxReplicas) is
    Degraded/InvalidSpec; the operator keeps running and converges once the spec is fixed."""
    await operator.start()
    await create_pd_stack(api, only=("llama-pd",))
    spec = {"serviceRef": {"name": "llama-pd"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}}
    pool = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ServingPool",
            "metadata": {"name": "bad", "namespace": NS}, "spec": spec}  # fmt: skip
    await api(api.kube.create, pool)
    obj = await wait_for(api, "ServingPool", "bad", has_condition("Degraded", "True", "InvalidSpec"))
    assert "minReplicas (5) must not exceed maxReplicas (2)" in condition(obj, "Degraded")["message"]
    assert await api(api.kube.get, "StatefulSet", NS, "bad-worker") is None
    await api(api.kube.patch, "ServingPool", NS, "bad", {"spec": {"autoscaling": {"minReplicas": 1}}})
    await wait_for(api, "StatefulSet", "bad-worker")
    await wait_for(api, "ServingPool", "bad", has_condition("Degraded", "False"))
