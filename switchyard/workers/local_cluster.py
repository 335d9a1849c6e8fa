"""A pool of engine instances on a local (or joined) Ray cluster, as one object.

``switchyard serve`` and the integration tests need the same sequence: start Ray with the
environment the engines need, start a supervisor, start its instances, and follow its
membership. Keeping that here keeps Ray out of the composition code above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from switchyard.messages import Membership
from switchyard.workers.supervisor import PoolSpec, Supervisor, follow_membership

logger = logging.getLogger(__name__)

__all__ = ["LocalPool", "engine_environment", "start_local_pool"]


def engine_environment(spec: PoolSpec) -> dict[str, str]:
    """Environment variables every Ray worker needs to host this pool's engines.

    Ray workers do not inherit changes the driver makes after start-up, so the variables
    travel in the job's ``runtime_env``.
    """
    env: dict[str, str] = {}
    if spec.engine.kind == "vllm":
        from switchyard.workers.vllm_env import vllm_env

        cache_root = Path(
            os.environ.get("SWITCHYARD_CACHE_DIR") or Path(tempfile.gettempdir()) / "switchyard"
        )
        env.update(vllm_env(spec.engine, cache_dir=cache_root))
    # Pass through the cache location so restarted instances find the same models.
    if os.environ.get("SWITCHYARD_CACHE_DIR"):
        env["SWITCHYARD_CACHE_DIR"] = os.environ["SWITCHYARD_CACHE_DIR"]
    return env


@dataclass
class LocalPool:
    """A started pool: its supervisor handle and the task feeding membership to a router."""

    supervisor: Any
    membership: Membership
    started_ray: bool
    _follow_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def follow(self, apply: Callable[[Membership], None]) -> None:
        """Feed ``apply`` the current membership now and every change from then on."""
        apply(self.membership)
        self._follow_task = asyncio.create_task(follow_membership(self.supervisor, apply))

    async def instance_handle(self, instance_id: str) -> Any:
        """Ray handle of one instance actor (tests kill it to exercise restarts)."""
        return await self.supervisor.instance_handle.remote(instance_id)

    async def stop(self) -> None:
        """Stop following, stop every instance, and shut Ray down if this pool started it."""
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
        with contextlib.suppress(Exception):
            await self.supervisor.stop.remote()
        with contextlib.suppress(Exception):
            ray.kill(self.supervisor, no_restart=True)
        if self.started_ray:
            ray.shutdown()


async def start_local_pool(
    spec: PoolSpec, *, ray_address: str | None = None, num_cpus: int | None = None
) -> LocalPool:
    """Start (or join) Ray, start a supervisor for ``spec`` and wait until its instances serve."""
    started = False
    if not ray.is_initialized():
        ray.init(
            address=ray_address,
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace="switchyard",
            runtime_env={"env_vars": engine_environment(spec)},
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        started = True
    supervisor = Supervisor.options(name=f"supervisor-{spec.name}").remote(spec)
    try:
        membership: Membership = await supervisor.start.remote()
    except BaseException:
        ray.kill(supervisor, no_restart=True)
        if started:
            ray.shutdown()
        raise
    return LocalPool(supervisor=supervisor, membership=membership, started_ray=started)
