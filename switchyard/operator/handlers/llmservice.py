"""LLMService handlers: the Ray head, the router and its Services, the config naming its pools.

Level-based like every handler here: parse the spec, check what the spec points at (the model
source), render, apply what differs, report. A model source that cannot work is reported as
``Degraded`` with a reason naming it: ``UnsupportedModelURI`` (a scheme without a fetcher;
``hf://`` is fetched by an init container) is permanent until the spec changes;
``ModelPVCNotFound`` and ``ModelPVCLost`` are retried (the claim may appear or be restored).
After converging, the service wakes the pools that were waiting for it. Readiness (router pods
ready) also follows the children's own events, so status moves when pods become ready without
a spec change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import kopf
from pydantic import ValidationError

from switchyard.operator.crd import LLMServiceSpec
from switchyard.operator.crd.conditions import standard_conditions
from switchyard.operator.handlers.common import (
    GROUP,
    VERSION,
    Degraded,
    PoolsIndex,
    apply_children,
    attached_pools,
    degraded_status,
    delete_children,
    index_entries,
    is_degraded,
    owner_of,
    parse,
    raise_for,
    readiness,
    set_status,
    status_patch,
)
from switchyard.operator.handlers.servingpool import wake_pool
from switchyard.operator.render.objects import Ports, child_names
from switchyard.operator.render.service import service_children
from switchyard.operator.settings import OperatorOptions

__all__ = ["check_model", "cleanup_service", "converge_service", "reconcile_service", "workload_changed"]

SUPPORTED_URI_SCHEMES = frozenset({"hf"})
"""URI schemes a ``fetch-model`` init container can download (``render_pods.model_fetchers``)."""

# Pools in these states wait for their service; a converged service re-runs them at once.
_WAITING_REASONS = frozenset({"ServiceNotFound", "ServiceInvalid", "ServiceDegraded"})


def check_model(kube: Any, namespace: str, spec: LLMServiceSpec, options: OperatorOptions) -> None:
    """Raise ``Degraded`` when the model source cannot be mounted."""
    model = spec.model
    if model.uri is not None:
        scheme = urlsplit(model.uri).scheme or "(none)"
        if scheme not in SUPPORTED_URI_SCHEMES:
            supported = ", ".join(f"{s}://" for s in sorted(SUPPORTED_URI_SCHEMES))
            raise Degraded(
                "UnsupportedModelURI",
                f"model.uri scheme {scheme!r} has no fetcher (supported: {supported}); "
                "put the model on a PVC and use model.pvc",
            )
    if model.pvc is not None:
        claim = kube.get("PersistentVolumeClaim", namespace, model.pvc.claim_name)
        if claim is None:
            raise Degraded(
                "ModelPVCNotFound",
                f"PersistentVolumeClaim {model.pvc.claim_name!r} (model.pvc.claimName) does not exist",
                delay=options.model_pvc_wait_s,
            )
        if (claim.get("status") or {}).get("phase") == "Lost":
            raise Degraded(
                "ModelPVCLost",
                f"PersistentVolumeClaim {model.pvc.claim_name!r} lost its volume",
                delay=options.model_pvc_wait_s,
            )


def _endpoints(name: str, namespace: str, spec: LLMServiceSpec, ports: Ports) -> list[str]:
    names = child_names(name)
    return [
        f"http://{names['router']}.{namespace}.svc:{spec.gateway.port}",
        f"{names['router_grpc']}.{namespace}.svc:{ports.router_grpc}",
    ]


def converge_service(body: Mapping[str, Any], *, memo: Any, index: Any, logger: Any) -> dict[str, Any]:
    """Make the service's children match its spec; returns the status changes."""
    kube, options = memo["kube"], memo["options"]
    owner = owner_of("LLMService", body)
    spec = parse(LLMServiceSpec, body.get("spec") or {}, "LLMService spec")
    check_model(kube, owner.namespace, spec, options)
    pools = attached_pools(index, owner.namespace, owner.name)
    ports = Ports(router_grpc=options.router_grpc_port, kvcache=options.kvcache_port)
    try:
        children = service_children(owner, spec, pools, ports)
    except ValidationError as exc:  # a pool that cannot be expressed as a PoolConfig
        raise Degraded("InvalidConfig", f"router config does not validate: {exc.errors()[0]['msg']}") from exc
    router = apply_children(kube, children, logger)["Deployment", child_names(owner.name)["router"]]
    ready_count = int((router.get("status") or {}).get("readyReplicas") or 0)
    ready, reason, message = readiness(ready_count, spec.router.replicas, "router")
    return status_patch(
        body.get("status"),
        generation=body["metadata"].get("generation"),
        conditions=standard_conditions(ready=ready, progressing=not ready, reason=reason, message=message),
        replicas=spec.router.replicas,
        readyReplicas=ready_count,
        endpoints=_endpoints(owner.name, owner.namespace, spec, ports),
    )


@kopf.on.resume(GROUP, VERSION, "llmservices", id="reconcile")
@kopf.on.create(GROUP, VERSION, "llmservices", id="reconcile")
@kopf.on.update(GROUP, VERSION, "llmservices", id="reconcile", field="spec")
def reconcile_service(
    body: kopf.Body,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    pools_by_service: PoolsIndex | None = None,
    **_: Any,
) -> None:
    """Converge the service's children, report status, then wake pools that waited for it."""
    try:
        changes = converge_service(body, memo=memo, index=pools_by_service, logger=logger)
    except Degraded as exc:
        set_status(patch, degraded_status(body.get("status"), body.metadata.get("generation"), exc))
        raise_for(exc)
    set_status(patch, changes)
    for entry in index_entries(pools_by_service, namespace, name):
        conditions = entry["status"].get("conditions") or []
        if any(c.get("type") == "Degraded" and c.get("reason") in _WAITING_REASONS for c in conditions):
            wake_pool(entry, memo=memo, logger=logger)


@kopf.on.delete(GROUP, VERSION, "llmservices", id="cleanup")
def cleanup_service(
    name: str,
    namespace: str | None,
    memo: kopf.Memo,
    logger: kopf.Logger,
    pools_by_service: PoolsIndex | None = None,
    **_: Any,
) -> None:
    """Delete what the service owns; its pools stay (separate objects) and report ServiceNotFound."""
    kube = memo["kube"]
    names = child_names(name)
    delete_children(
        kube,
        namespace,
        [
            ("Deployment", names["router"]),
            ("Service", names["router"]),
            ("Service", names["router_grpc"]),
            ("ConfigMap", names["config"]),
            ("Deployment", names["head"]),
            ("Service", names["head"]),
        ],
        logger,
    )
    gone = Degraded("ServiceNotFound", f"LLMService {name!r} was deleted")
    for entry in index_entries(pools_by_service, namespace, name):
        pool = kube.get("ServingPool", namespace, entry["name"])
        if pool is not None and not pool["metadata"].get("deletionTimestamp"):
            changes = degraded_status(pool.get("status"), pool["metadata"].get("generation"), gone)
            if changes:
                kube.patch("ServingPool", namespace, entry["name"], {"status": changes}, subresource="status")


_MANAGED = {"app.kubernetes.io/managed-by": "switchyard-operator"}


@kopf.on.event("apps", "v1", "deployments", id="workload-readiness", labels=_MANAGED)
@kopf.on.event("apps", "v1", "statefulsets", id="workload-readiness", labels=_MANAGED)
def workload_changed(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Mirror a router/worker/cache workload's readiness into its owner's status.

    Only readiness moves here: an owner that is Degraded or draining keeps what its reconcile
    wrote, and nothing is written when the status already reads the same.
    """
    component = body.metadata.labels.get("app.kubernetes.io/component")
    if component not in {"router", "worker", "kvcache"}:
        return
    ref = next((r for r in body.metadata.get("ownerReferences") or [] if r.get("controller")), None)
    if ref is None or not str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
        return
    kube = memo["kube"]
    owner = kube.get(ref["kind"], namespace, ref["name"])
    if owner is None or owner["metadata"].get("uid") != ref.get("uid") or is_degraded(owner):
        return
    status = owner.get("status") or {}
    if any(c.get("reason") == "Draining" for c in status.get("conditions") or []):
        return
    desired = int(body.get("spec", {}).get("replicas") or 0)
    ready_count = int((body.get("status") or {}).get("readyReplicas") or 0)
    ready, reason, message = readiness(ready_count, desired, component)
    changes = status_patch(
        status,
        generation=status.get("observedGeneration"),
        conditions=standard_conditions(ready=ready, progressing=not ready, reason=reason, message=message),
        readyReplicas=ready_count,
    )
    if changes:
        kube.patch(ref["kind"], namespace, ref["name"], {"status": changes}, subresource="status")
