"""What a ServingPool becomes: the ``<pool>-worker`` StatefulSet of Ray worker pods + a headless Service.

Each pod joins the service's Ray cluster with one unit of the ``pool-<pool>`` resource (where
the supervisor places that pool's instance actors) and one unit of a resource named after the
pod itself, which pins instance ``<pool>-<i>`` to pod ``<pool>-worker-<i>``, so a StatefulSet
scale-in removes exactly the instances the supervisor drained.
"""

from __future__ import annotations

import json
import math
from typing import Any

from switchyard.operator.crd import LLMServiceSpec, ServingPoolSpec
from switchyard.operator.crd.models import pool_ray_resource, worker_set_name
from switchyard.operator.render.objects import (
    ENV,
    RAY_GCS_PORT,
    WORKER_SERVICE_ACCOUNT,
    Owner,
    child_names,
    labels,
    model_fetchers,
    model_volume,
    pod_spec,
    pool_selector,
    scratch_volumes,
    stateful_set,
)

__all__ = ["pool_children"]


def _worker_resources(pool: ServingPoolSpec) -> dict[str, Any]:
    res = pool.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.gpus:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = res.gpus
    if res.cpu is not None:
        requests["cpu"] = res.cpu
    if res.memory is not None:
        requests["memory"] = limits["memory"] = res.memory
    return {"requests": requests, "limits": limits}


def _cpu_count(quantity: str) -> int:
    cores = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, math.floor(cores))


def pool_children(
    owner: Owner, pool: ServingPoolSpec, service: LLMServiceSpec, *, replicas: int | None = None
) -> list[dict[str, Any]]:
    """Worker StatefulSet + its headless Service. ``replicas`` overrides the spec (held during a drain)."""
    svc = pool.service_ref.name
    name = worker_set_name(owner.name)
    lbls = labels(svc, "worker", pool.role, owner.name)
    selector = pool_selector(svc, owner.name)
    head = f"{child_names(svc)['head']}.{owner.namespace}.svc:{RAY_GCS_PORT}"
    command = [
        "ray",
        "start",
        f"--address={head}",
        f"--num-gpus={pool.resources.gpus}",
        # Kubernetes expands $(POD_NAME): each pod also advertises its own name, the resource
        # that pins instance <pool>-<i> to pod <pool>-worker-<i> (PoolConfig.instance_resource).
        "--resources=" + json.dumps({pool_ray_resource(owner.name): 1, "$(POD_NAME)": 1}),
        "--block",
    ]
    if pool.resources.cpu is not None:
        command.insert(-1, f"--num-cpus={_cpu_count(pool.resources.cpu)}")
    model_vols, model_mounts = model_volume(service)
    tmp_vols, tmp_mounts = scratch_volumes(shm=True)
    container = {
        "name": "worker",
        "command": command,
        "env": [
            *ENV,
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "SWITCHYARD_POOL", "value": owner.name},
            {"name": "SWITCHYARD_ROLE", "value": pool.role},
        ],
        "resources": _worker_resources(pool),
        "volumeMounts": [*model_mounts, *tmp_mounts],
    }
    extra: dict[str, Any] = {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 60}
    if pool.node_selector:
        extra["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        extra["tolerations"] = [t.model_dump(exclude_none=True) for t in pool.tolerations]
    pod = pod_spec(
        service,
        image=service.images.worker,
        account=WORKER_SERVICE_ACCOUNT,
        container=container,
        volumes=[*model_vols, *tmp_vols],
        init_containers=model_fetchers(service),
        **extra,
    )
    count = pool.replicas if replicas is None else replicas
    return stateful_set(owner, name, lbls, selector, replicas=count, pod=pod, ports={})
