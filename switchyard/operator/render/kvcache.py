"""What a KVCachePool becomes: a StatefulSet of ``switchyard kvcache-server`` pods + a headless Service.

Why apart from ``render.py``: the cache tier's manifest is tied to the server's command line
(``switchyard/kvcache/cli.py``), not to the Ray/router composition, and each shard is addressed
on its own (``<pool>-kvcache-<i>.<pool>-kvcache.<ns>.svc:<port>``), hence headless.

Memory. ``memoryPerReplica`` is what the store may hold (``--memory``; it charges payload plus
per-block overhead against it). The pod asks for that plus headroom for the interpreter and
its HTTP stack (~100 MiB), request bodies in flight (up to the block limit each) and allocator
slack: ``max(256Mi, 10 %)``. Request equals limit, so the pod is Guaranteed for memory and is not
the first one evicted under node pressure; losing a shard loses only cached blocks, which
engines recompute.
"""

from __future__ import annotations

import math
from typing import Any

from switchyard.kvcache.config import memory_bytes
from switchyard.operator.crd import KVCachePoolSpec, LLMServiceSpec
from switchyard.operator.render.objects import (
    DEFAULT_PORTS,
    ENV,
    WORKER_SERVICE_ACCOUNT,
    Owner,
    Ports,
    labels,
    pod_spec,
    pool_selector,
    scratch_volumes,
    stateful_set,
)

__all__ = ["HEADROOM_FRACTION", "HEADROOM_MIN_BYTES", "kvcache_children", "kvcache_pod_memory"]

HEADROOM_MIN_BYTES = 256 * 2**20
HEADROOM_FRACTION = 0.10
_MI = 2**20


def kvcache_pod_memory(memory_per_replica: str) -> str:
    """Memory request/limit of one cache pod: the store's bytes plus headroom, in whole MiB."""
    store = memory_bytes(memory_per_replica)
    total = store + max(HEADROOM_MIN_BYTES, math.ceil(store * HEADROOM_FRACTION))
    return f"{math.ceil(total / _MI)}Mi"


def kvcache_children(
    owner: Owner, spec: KVCachePoolSpec, service: LLMServiceSpec, ports: Ports = DEFAULT_PORTS
) -> list[dict[str, Any]]:
    """Cache server StatefulSet + its headless Service."""
    svc = spec.service_ref.name
    name = f"{owner.name}-kvcache"
    lbls = labels(svc, "kvcache", "kvcache", owner.name)
    selector = pool_selector(svc, owner.name, component="kvcache")
    tmp_vols, tmp_mounts = scratch_volumes(shm=False)
    pod_memory = kvcache_pod_memory(spec.memory_per_replica)
    container = {
        "name": "kvcache",
        "command": [
            "switchyard",
            "kvcache-server",
            "--host=0.0.0.0",
            f"--port={ports.kvcache}",
            f"--memory={spec.memory_per_replica}",
            f"--eviction={spec.eviction_policy}",
            "--log-format=json",
        ],
        "ports": [{"name": "kvcache", "containerPort": ports.kvcache}],
        "env": list(ENV),
        "resources": {"requests": {"memory": pod_memory}, "limits": {"memory": pod_memory}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ports.kvcache}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": ports.kvcache},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
        },
        "volumeMounts": tmp_mounts,
    }
    pod = pod_spec(
        service,
        image=service.images.worker,
        account=WORKER_SERVICE_ACCOUNT,
        container=container,
        volumes=tmp_vols,
        automountServiceAccountToken=False,
        # the server's own grace (5 s) plus margin for the SIGTERM to arrive
        terminationGracePeriodSeconds=15,
    )
    return stateful_set(
        owner, name, lbls, selector, replicas=spec.replicas, pod=pod, ports={"kvcache": ports.kvcache}
    )
