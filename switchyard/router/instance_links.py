"""The router's links to its instances: one ``WorkerClient`` each, and the task feeding its load.

Why apart from ``core.py``: the core decides and streams; keeping a gRPC channel and a load
subscription per member, resubscribing with backoff when a stream breaks and closing both when
the member leaves, is connection housekeeping with its own failure modes. The registry stays
the one place routing state lives: this module only writes load reports and "down" marks to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from switchyard import metrics
from switchyard.errors import SwitchyardError
from switchyard.messages import InstanceInfo
from switchyard.router.registry import InstanceRegistry
from switchyard.router.worker_client import WorkerClient

__all__ = ["InstanceLinks"]

logger = logging.getLogger(__name__)

_LOAD_RETRY_MIN_S = 0.1
_LOAD_RETRY_MAX_S = 2.0


class InstanceLinks:
    """Clients of the member instances, their load followers, and the core's background tasks."""

    def __init__(
        self,
        registry: InstanceRegistry,
        *,
        connector: Callable[[InstanceInfo], WorkerClient],
        load_report_interval_s: float,
    ) -> None:
        self._registry = registry
        self._connector = connector
        self._interval_s = load_report_interval_s
        self._clients: dict[str, WorkerClient] = {}
        self._load_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._following = False

    def get(self, instance_id: str) -> WorkerClient | None:
        return self._clients.get(instance_id)

    def __getitem__(self, instance_id: str) -> WorkerClient:
        return self._clients[instance_id]

    def follow_load(self) -> None:
        """Start following the load of every member, now and as members join."""
        self._following = True
        for iid, client in self._clients.items():
            self._start_load(iid, client)

    def add(self, info: InstanceInfo) -> None:
        """Connect to a new member (and follow its load once following has started)."""
        client = self._clients[info.instance_id] = self._connector(info)
        if self._following:
            self._start_load(info.instance_id, client)

    def remove(self, instance_id: str) -> None:
        """Stop following a departed member and close its client; forget its metrics."""
        task = self._load_tasks.pop(instance_id, None)
        if task is not None:
            task.cancel()
        client = self._clients.pop(instance_id, None)
        if client is not None:
            self.spawn(client.close())
        metrics.forget_instance(instance_id)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background; ``close`` waits for it."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def idle(self) -> bool:
        """No background task is left (true after ``close``)."""
        return not self._background

    async def close(self) -> None:
        """Wait for background work (call after removing every member)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _start_load(self, instance_id: str, client: WorkerClient) -> None:
        if instance_id not in self._load_tasks:
            self._load_tasks[instance_id] = self.spawn(self._follow_load(instance_id, client))

    async def _follow_load(self, instance_id: str, client: WorkerClient) -> None:
        """Feed one instance's load reports into the registry, resubscribing after failures."""
        running = metrics.INSTANCE_RUNNING.labels(instance_id)
        waiting = metrics.INSTANCE_WAITING.labels(instance_id)
        kv_usage = metrics.INSTANCE_KV_USAGE.labels(instance_id)
        backoff = _LOAD_RETRY_MIN_S
        while True:
            try:
                async for report in client.stream_load(self._interval_s):
                    if self._registry.on_load_report(instance_id, report) is None:
                        return  # departed; the task is being cancelled anyway
                    running.set(report.num_running)
                    waiting.set(report.num_waiting)
                    kv_usage.set(report.kv_usage)
                    backoff = _LOAD_RETRY_MIN_S
                reason = "stream ended"
            except SwitchyardError as exc:
                reason = str(exc)
            except Exception:
                logger.exception("instance %s: load stream failed unexpectedly", instance_id)
                reason = "unexpected error"
            if self._registry.mark_down(instance_id):
                logger.warning("instance %s: load stream lost (%s); routing around it", instance_id, reason)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LOAD_RETRY_MAX_S)
