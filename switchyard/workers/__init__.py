"""Workers: the engine contract and the Ray runtime that keeps engines running.

Layout, one concept per place:

* here, the **Ray runtime**: ``InstanceActor`` (one engine served over the Worker gRPC
  service), ``Supervisor`` (keeps a pool's instances alive, publishes membership), the local
  cluster start-up (``start_local_pools``), the Worker gRPC server and the membership merger
  that routers use to follow several pools;
* ``workers.vllm``: the vLLM engine adapter and everything that touches vLLM's internals
  (sampling conversion, the KV connector and its control channel, environment, load, errors);
* ``workers.sim``: the simulator, a performance model of a vLLM engine for scale tests and
  benchmarks (cost model, instance, fleet, KV blocks, migration), with its GPU ``profiles/``.

The public names below resolve lazily (PEP 562): the Ray runtime imports Ray, and code that
only needs the simulator or the engine contract (benchmarks, the router's TTFT prior) must
not pay for that import, nor need Ray installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from switchyard.workers.engine import Engine
    from switchyard.workers.instance_actor import InstanceActor, build_engine, with_reachable_kv_endpoint
    from switchyard.workers.local_cluster import (
        LocalPool,
        engine_environment,
        start_local_pool,
        start_local_pools,
    )
    from switchyard.workers.membership import MembershipMerger
    from switchyard.workers.supervisor import PoolSpec, Supervisor, follow_membership
    from switchyard.workers.worker_server import WorkerServicer, start_worker_server

__all__ = [
    "Engine",
    "InstanceActor",
    "LocalPool",
    "MembershipMerger",
    "PoolSpec",
    "Supervisor",
    "WorkerServicer",
    "build_engine",
    "engine_environment",
    "follow_membership",
    "start_local_pool",
    "start_local_pools",
    "start_worker_server",
    "with_reachable_kv_endpoint",
]

_MODULE_OF = {
    "Engine": "engine",
    "InstanceActor": "instance_actor",
    "build_engine": "instance_actor",
    "with_reachable_kv_endpoint": "instance_actor",
    "LocalPool": "local_cluster",
    "engine_environment": "local_cluster",
    "start_local_pool": "local_cluster",
    "start_local_pools": "local_cluster",
    "MembershipMerger": "membership",
    "PoolSpec": "supervisor",
    "Supervisor": "supervisor",
    "follow_membership": "supervisor",
    "WorkerServicer": "worker_server",
    "start_worker_server": "worker_server",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
