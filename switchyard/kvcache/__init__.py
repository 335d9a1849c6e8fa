"""The shared CPU KV-cache tier: a block store keyed by chain hash and the server in front of it.

A KVCachePool's pods run ``switchyard kvcache-server`` (``cli.py``): a ``BlockStore``
(``store.py``, bounded by the pool's ``memoryPerReplica`` with its eviction policy) behind the
HTTP API in ``server.py``, with Prometheus series from ``metrics.py``. Importing this package
loads the store and configuration only; the server module pulls in Starlette and uvicorn.
"""

from __future__ import annotations

from switchyard.kvcache.config import DEFAULT_PORT, KVCacheServerConfig, memory_bytes
from switchyard.kvcache.store import BlockStore, EvictionPolicy, PutResult, StoreStats, check_key

__all__ = [
    "DEFAULT_PORT",
    "BlockStore",
    "EvictionPolicy",
    "KVCacheServerConfig",
    "PutResult",
    "StoreStats",
    "check_key",
    "memory_bytes",
]
