"""ServingPool handlers: a worker StatefulSet that joins its LLMService's Ray cluster.

Level-based: every run (create, resume, spec update, retry) computes the whole desired state
from the spec and the cluster, applies what differs, and reports status; nothing depends on
what changed. A pool whose LLMService does not exist yet is ``Degraded/ServiceNotFound`` and
retried with a growing delay (5 s up to 60 s, never a storm); when the service appears, its
reconcile converges waiting pools at once (``wake_pool``). A scale-in holds the old replica
count until the pods to be removed have drained (``switchyard.operator.drain``).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from switchyard.operator.crd import LLMServiceSpec, ServingPoolSpec
from switchyard.operator.crd.conditions import standard_conditions
from switchyard.operator.crd.models import worker_set_name
from switchyard.operator.drain import pending_drains, release_pods
from switchyard.operator.handlers.common import (
    GROUP,
    VERSION,
    Degraded,
    PoolsIndex,
    apply_children,
    attached_pools,
    degraded_status,
    delete_children,
    is_degraded,
    owner_of,
    parse,
    raise_for,
    readiness,
    set_status,
    status_patch,
)
from switchyard.operator.render.objects import child_names, model_path, pool_selector, selector_string
from switchyard.operator.render.pool import pool_children
from switchyard.operator.render.service import service_children
from switchyard.operator.settings import OperatorOptions

__all__ = ["cleanup_pool", "converge_pool", "reconcile_pool", "wake_pool"]


def _service(kube: Any, namespace: str, name: str, retry: int, options: OperatorOptions) -> dict[str, Any]:
    body: dict[str, Any] | None = kube.get("LLMService", namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        delays = options.service_wait_s
        raise Degraded(
            "ServiceNotFound",
            f"LLMService {name!r} does not exist in namespace {namespace!r}",
            delay=delays[min(retry, len(delays) - 1)],
        )
    return body


def _sync_service_config(
    kube: Any,
    svc_body: Mapping[str, Any],
    service: LLMServiceSpec,
    pools: dict[str, ServingPoolSpec],
    logger: Any,
) -> None:
    """Re-apply the service's children that list its pools (config and router), after a pool change."""
    children = service_children(owner_of("LLMService", svc_body), service, pools)
    apply_children(
        kube,
        [
            c
            for c in children
            if c["kind"] in ("ConfigMap", "Deployment")
            and c["metadata"]["name"] != child_names(svc_body["metadata"]["name"])["head"]
        ],
        logger,
    )


def converge_pool(
    body: Mapping[str, Any], *, memo: Any, index: Any, retry: int, logger: Any, sync_service: bool = True
) -> tuple[dict[str, Any], float | None]:
    """Make the pool's children match its spec. Returns (status changes, retry delay or None).

    Raises ``Degraded`` for what the pool cannot fix by itself.
    """
    kube, options = memo["kube"], memo["options"]
    owner = owner_of("ServingPool", body)
    ns, live_status = owner.namespace, body.get("status")
    generation = body["metadata"].get("generation")
    pool = parse(ServingPoolSpec, body.get("spec") or {}, "ServingPool spec")
    svc_body = _service(kube, ns, pool.service_ref.name, retry, options)
    try:
        service = LLMServiceSpec.model_validate(svc_body.get("spec") or {})
    except ValidationError as exc:
        raise Degraded(
            "ServiceInvalid", f"LLMService {pool.service_ref.name!r} has an invalid spec", delay=60
        ) from exc
    try:
        model_path(service)
    except ValueError as exc:
        raise Degraded("ServiceDegraded", f"LLMService {pool.service_ref.name!r}: {exc}", delay=60) from exc
    if is_degraded(svc_body):
        raise Degraded("ServiceDegraded", f"LLMService {pool.service_ref.name!r} is Degraded", delay=60)

    sts_name = worker_set_name(owner.name)
    live = kube.get("StatefulSet", ns, sts_name)
    current = int(live["spec"].get("replicas", 0)) if live else None
    hold: int | None = None
    if current is not None and current > pool.replicas:
        router_url = options.router_base_url(
            service=pool.service_ref.name, namespace=ns, port=service.gateway.port
        )
        pending = pending_drains(
            kube,
            memo["drain"],
            namespace=ns,
            pods=[f"{sts_name}-{i}" for i in range(pool.replicas, current)],
            router_url=router_url,
            timeout_s=options.drain_timeout_s,
            now=datetime.datetime.now(datetime.UTC),
            logger=logger,
        )
        hold = current if pending else None
    else:
        selector = pool_selector(pool.service_ref.name, owner.name)
        release_pods(kube, namespace=ns, selector=selector, keep_below=pool.replicas, sts_name=sts_name)
    sts = apply_children(kube, pool_children(owner, pool, service, replicas=hold), logger)[
        "StatefulSet", sts_name
    ]
    if sync_service:
        pools = attached_pools(index, ns, pool.service_ref.name)
        pools[owner.name] = pool
        _sync_service_config(kube, svc_body, service, pools, logger)
    ready_count = int((sts.get("status") or {}).get("readyReplicas") or 0)
    replicas = hold if hold is not None else pool.replicas
    if hold is not None:
        conds = standard_conditions(
            ready=False,
            progressing=True,
            reason="Draining",
            message=f"draining pods {pool.replicas}..{hold - 1} before scaling to {pool.replicas}",
        )
    else:
        ready, reason, message = readiness(ready_count, pool.replicas, "worker")
        conds = standard_conditions(ready=ready, progressing=not ready, reason=reason, message=message)
    changes = status_patch(
        live_status,
        generation=generation,
        conditions=conds,
        replicas=replicas,
        readyReplicas=ready_count,
        selector=selector_string(pool_selector(pool.service_ref.name, owner.name)),
    )
    return changes, (options.drain_poll_s if hold is not None else None)


@kopf.on.resume(GROUP, VERSION, "servingpools", id="reconcile")
@kopf.on.create(GROUP, VERSION, "servingpools", id="reconcile")
@kopf.on.update(GROUP, VERSION, "servingpools", id="reconcile", field="spec")
def reconcile_pool(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    retry: int,
    logger: kopf.Logger,
    pools_by_service: PoolsIndex | None = None,
    **_: Any,
) -> None:
    """Converge the worker StatefulSet; report Ready/Progressing/Degraded."""
    try:
        changes, delay = converge_pool(body, memo=memo, index=pools_by_service, retry=retry, logger=logger)
    except Degraded as exc:
        set_status(patch, degraded_status(body.get("status"), body.metadata.get("generation"), exc))
        raise_for(exc)
    set_status(patch, changes)
    if delay is not None:
        raise kopf.TemporaryError("waiting for draining pods", delay=delay)


def wake_pool(entry: Mapping[str, Any], *, memo: Any, logger: Any) -> None:
    """Converge a pool that waited for its service, from the service's reconcile (through the API:
    Kopf's own retry of the pool is still scheduled and will then find nothing to do)."""
    kube = memo["kube"]
    ns, name = entry["body"]["metadata"]["namespace"], entry["name"]
    body = kube.get("ServingPool", ns, name)
    if body is None:
        return
    try:
        changes, _delay = converge_pool(body, memo=memo, index={}, retry=0, logger=logger, sync_service=False)
    except Degraded as exc:
        changes = degraded_status(body.get("status"), body["metadata"].get("generation"), exc)
    if changes:
        kube.patch("ServingPool", ns, name, {"status": changes}, subresource="status")


@kopf.on.delete(GROUP, VERSION, "servingpools", id="cleanup")
def cleanup_pool(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    memo: kopf.Memo,
    logger: kopf.Logger,
    pools_by_service: PoolsIndex | None = None,
    **_: Any,
) -> None:
    """Delete the worker StatefulSet and its Service; drop the pool from the service's config."""
    kube = memo["kube"]
    delete_children(
        kube, namespace, [("StatefulSet", worker_set_name(name)), ("Service", worker_set_name(name))], logger
    )
    service_name = str((spec.get("serviceRef") or {}).get("name", ""))
    svc_body = kube.get("LLMService", namespace, service_name) if service_name else None
    if svc_body is None or svc_body.get("metadata", {}).get("deletionTimestamp"):
        return
    try:
        service = LLMServiceSpec.model_validate(svc_body.get("spec") or {})
        pools = attached_pools(pools_by_service, namespace, service_name)
        pools.pop(name, None)
        _sync_service_config(kube, svc_body, service, pools, logger)
    except (ValidationError, ValueError, Degraded) as exc:
        logger.warning("service %s config not refreshed after pool removal: %s", service_name, exc)
