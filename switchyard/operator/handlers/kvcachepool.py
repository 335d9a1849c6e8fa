"""KVCachePool handlers: a StatefulSet of cache servers and the headless Service addressing them.

Same shape as the ServingPool's: level-based reconcile, ``Degraded/ServiceNotFound`` with a
growing retry delay while its LLMService is missing, explicit deletion of what it owns. The
status lists one endpoint per shard (``<pod>.<service>.<ns>.svc:<port>``), where each pod runs
``switchyard kvcache-server`` (``switchyard.kvcache``). No engine reads or writes them yet: the
vLLM KV connector that would is a separate piece of work.
"""

from __future__ import annotations

from typing import Any

import kopf

from switchyard.operator.crd import KVCachePoolSpec, LLMServiceSpec
from switchyard.operator.crd.conditions import standard_conditions
from switchyard.operator.handlers.common import (
    GROUP,
    VERSION,
    Degraded,
    apply_children,
    degraded_status,
    delete_children,
    owner_of,
    parse,
    raise_for,
    readiness,
    set_status,
    status_patch,
)
from switchyard.operator.render.kvcache import kvcache_children
from switchyard.operator.render.objects import Ports

__all__ = ["cleanup_kvcache", "reconcile_kvcache"]


@kopf.on.resume(GROUP, VERSION, "kvcachepools", id="reconcile")
@kopf.on.create(GROUP, VERSION, "kvcachepools", id="reconcile")
@kopf.on.update(GROUP, VERSION, "kvcachepools", id="reconcile", field="spec")
def reconcile_kvcache(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, logger: kopf.Logger, **_: Any
) -> None:
    """Converge the cache StatefulSet and Service; report status."""
    kube, options = memo["kube"], memo["options"]
    owner = owner_of("KVCachePool", body)
    generation = body.metadata.get("generation")
    try:
        spec = parse(KVCachePoolSpec, body.get("spec") or {}, "KVCachePool spec")
        svc_body = kube.get("LLMService", owner.namespace, spec.service_ref.name)
        if svc_body is None or svc_body["metadata"].get("deletionTimestamp"):
            delays = options.service_wait_s
            raise Degraded(
                "ServiceNotFound",
                f"LLMService {spec.service_ref.name!r} does not exist in namespace {owner.namespace!r}",
                delay=delays[min(retry, len(delays) - 1)],
            )
        service = parse(LLMServiceSpec, svc_body.get("spec") or {}, "referenced LLMService spec")
        ports = Ports(router_grpc=options.router_grpc_port, kvcache=options.kvcache_port)
        live = apply_children(kube, kvcache_children(owner, spec, service, ports), logger)
    except Degraded as exc:
        if exc.reason == "InvalidSpec" and "referenced" in exc.message:
            exc = Degraded("ServiceInvalid", exc.message, delay=60.0)
        set_status(patch, degraded_status(body.get("status"), generation, exc))
        raise_for(exc)
    name = f"{owner.name}-kvcache"
    sts = live["StatefulSet", name]
    ready_count = int((sts.get("status") or {}).get("readyReplicas") or 0)
    ready, reason, message = readiness(ready_count, spec.replicas, "kvcache")
    endpoints = [f"{name}-{i}.{name}.{owner.namespace}.svc:{ports.kvcache}" for i in range(spec.replicas)]
    set_status(
        patch,
        status_patch(
            body.get("status"),
            generation=generation,
            conditions=standard_conditions(
                ready=ready, progressing=not ready, reason=reason, message=message
            ),
            replicas=spec.replicas,
            readyReplicas=ready_count,
            endpoints=endpoints,
        ),
    )


@kopf.on.delete(GROUP, VERSION, "kvcachepools", id="cleanup")
def cleanup_kvcache(name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Delete the cache StatefulSet and its Service."""
    children = [("StatefulSet", f"{name}-kvcache"), ("Service", f"{name}-kvcache")]
    delete_children(memo["kube"], namespace, children, logger)
