"""The supervisor: keeps a pool's engine instances alive and publishes who they are.

One supervisor (a Ray actor) per pool starts N instance actors, notices when one dies, starts
a replacement (same instance id, next incarnation) after a back-off, and keeps a versioned
membership that routers follow by long-polling ``watch``. Long-polling instead of pushing
means routers can come and go (several replicas, restarts) without the supervisor knowing
them, and a router that missed versions simply gets the latest snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from pydantic import Field, SecretStr
from ray.exceptions import RayActorError

from switchyard.config import EngineConfig, InternalToken, PoolConfig, ServeConfig
from switchyard.errors import EngineDeadError
from switchyard.messages import InstanceInfo, Membership
from switchyard.workers.instance_actor import InstanceActor

logger = logging.getLogger(__name__)

__all__ = ["PoolSpec", "Supervisor", "follow_membership"]

# Cap of the exponential back-off between failed restarts: a crash-looping instance costs
# one start attempt per minute, not a spinning CPU.
_MAX_RESTART_BACKOFF_S = 60.0


class PoolSpec(PoolConfig):
    """What one supervisor keeps running: a ``PoolConfig`` (name, role, instances, placement)
    with its engine resolved, plus what the serving process decides at start-up (model
    directory, served name, address, timeouts). Build it with ``from_config``."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    """How each instance's engine is built (resolved: never None, unlike the pool's)."""

    model_dir: str | None = None
    """Model directory every instance loads (vLLM); None for the simulator."""

    served_model_name: str
    """Model name instances advertise; the gateway's tokenizer map is keyed by it."""

    host: str | None = "127.0.0.1"
    """Address instances bind their Worker gRPC service to and advertise; None takes each node's
    IP (instances on other machines, e.g. Kubernetes worker pods), never all interfaces."""

    drain_timeout_s: float = Field(default=300.0, ge=0)
    """On scale-in, how long a removed instance may keep finishing its requests before it stops."""

    restart_backoff_s: float = Field(default=1.0, ge=0)
    """First wait before restarting a dead instance; doubles per failed attempt."""

    start_timeout_s: float = Field(default=600.0, gt=0)
    """Give up on an instance whose engine has not started in this long."""

    internal_token: InternalToken | None = None
    """Token the instances' Worker services require (``ServeConfig.internal_token``); fixed for
    the supervisor's life, since running instances accept only the one they started with.
    ``start_local_pools`` always sets it; None (a supervisor built by hand) serves unauthenticated."""

    @classmethod
    def from_config(
        cls, pool: PoolConfig, config: ServeConfig, *, model_dir: Path | None, served_model_name: str
    ) -> PoolSpec:
        """The spec of ``pool`` as ``config`` serves it: the pool's engine or else the
        service-wide one, ``model_dir`` for vLLM engines only (the simulator loads none), and
        instances reachable from other machines when joining a Ray cluster."""
        engine = pool.engine or config.engine
        shared = {name: getattr(pool, name) for name in PoolConfig.model_fields if name != "engine"}
        return cls(
            **shared,
            engine=engine,
            model_dir=str(model_dir) if model_dir is not None and engine.kind == "vllm" else None,
            served_model_name=served_model_name,
            restart_backoff_s=config.restart_backoff_s,
            start_timeout_s=config.instance_start_timeout_s,
            # Joined cluster: instances run on other machines and must be reachable from here.
            host=None if config.ray_address else "127.0.0.1",
        )


class _SupervisorImpl:
    def __init__(self, spec: PoolSpec) -> None:
        self._spec = spec
        self._actors: dict[str, Any] = {}
        self._infos: dict[str, InstanceInfo] = {}
        self._incarnation: dict[str, int] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._stopping = False
        self._started = False
        self._draining: dict[str, asyncio.Task[None]] = {}
        self.restarts = 0

    def _bump(self) -> None:
        self._version += 1
        # Waking every waiter and replacing the event keeps ``watch`` free of lost wake-ups.
        self._changed.set()
        self._changed = asyncio.Event()

    def _membership(self) -> Membership:
        return Membership(version=self._version, instances=tuple(self._infos[k] for k in sorted(self._infos)))

    async def start(self) -> Membership:
        """Start every instance; raises the first start failure (nothing left running then).

        Idempotent: a supervisor shared by several routers (a detached, named actor on a joined
        Ray cluster) is started by the first and merely returns its membership to the others.
        """
        if self._started:
            return self._membership()
        self._started = True
        ids = [f"{self._spec.name}-{i}" for i in range(self._spec.instances)]
        results = await asyncio.gather(*(self._start_instance(i, 0) for i in ids), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        return self._membership()

    async def apply(self, spec: PoolSpec) -> Membership:
        """Adopt a new spec: start missing instances, drain and stop surplus ones.

        Engine settings of a running instance are not changed in place; a changed ``engine``
        applies to instances started from now on (restarts included). Surplus instances leave
        membership at once, so routers stop sending them work, and stop once their requests
        finish or ``drain_timeout_s`` passes.
        """
        # The token stays the one the running instances were started with; start_local_pools
        # refuses a router that brings another, so this only fills in a spec that has none.
        self._spec = spec.model_copy(update={"internal_token": self._spec.internal_token})
        if not self._started:
            return self._membership()
        wanted = {f"{spec.name}-{i}" for i in range(spec.instances)}
        missing = sorted(wanted - set(self._actors) - set(self._draining))
        surplus = sorted(set(self._actors) - wanted)
        for instance_id in surplus:
            actor = self._actors.pop(instance_id)
            self._infos.pop(instance_id, None)
            watcher = self._watchers.pop(instance_id, None)
            if watcher is not None:
                watcher.cancel()
            self._draining[instance_id] = asyncio.create_task(self._drain_and_stop(instance_id, actor))
        if surplus:
            self._bump()
        await asyncio.gather(*(self._start_instance(i, 0) for i in missing))
        return self._membership()

    async def _drain_and_stop(self, instance_id: str, actor: Any) -> None:
        """Wait until the instance runs nothing (or the drain timeout), then stop it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._spec.drain_timeout_s
        try:
            # Polling a remote actor: there is no event to await across processes.
            while loop.time() < deadline and await actor.busy.remote():  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            await actor.stop.remote(5.0)
        except RayActorError:
            pass  # already gone: nothing left to drain
        finally:
            ray.kill(actor, no_restart=True)
            self._draining.pop(instance_id, None)
            logger.info("instance %s drained and stopped", instance_id)

    async def _start_instance(self, instance_id: str, incarnation: int) -> None:
        spec = self._spec
        options: dict[str, Any] = {"name": f"{instance_id}.{incarnation}"}
        resources: dict[str, float] = {}
        if spec.ray_resource:
            resources[spec.ray_resource] = 1
        if spec.instance_resource:
            index = int(instance_id.rsplit("-", 1)[1])
            resources[spec.instance_resource.format(index=index)] = 1
        if resources:
            options["resources"] = resources
        actor = InstanceActor.options(**options).remote()
        try:
            info: InstanceInfo = await asyncio.wait_for(
                actor.start.remote(
                    spec.engine,
                    instance_id=instance_id,
                    incarnation=incarnation,
                    model_dir=spec.model_dir,
                    host=spec.host,
                    served_model_name=spec.served_model_name,
                    role=spec.role,
                    internal_token=spec.internal_token,
                ),
                timeout=spec.start_timeout_s,
            )
        except TimeoutError:
            ray.kill(actor, no_restart=True)
            raise EngineDeadError(
                f"instance {instance_id} did not start within {spec.start_timeout_s:g} s "
                "(instance_start_timeout_s); it was stopped"
            ) from None
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        if self._stopping:
            ray.kill(actor, no_restart=True)
            return
        self._actors[instance_id] = actor
        self._infos[instance_id] = info
        self._incarnation[instance_id] = incarnation
        self._watchers[instance_id] = asyncio.create_task(self._watch_instance(instance_id, actor))
        self._bump()

    async def _watch_instance(self, instance_id: str, actor: Any) -> None:
        try:
            await actor.run_until_stopped.remote()
            return  # clean stop
        except RayActorError as exc:
            if self._stopping:
                return
            logger.warning("instance %s died (%s); restarting it", instance_id, type(exc).__name__)
        self._infos.pop(instance_id, None)
        self._actors.pop(instance_id, None)
        self._bump()
        await self._restart(instance_id)

    async def _restart(self, instance_id: str) -> None:
        backoff = self._spec.restart_backoff_s
        while not self._stopping:
            await asyncio.sleep(backoff)
            incarnation = self._incarnation.get(instance_id, 0) + 1
            self._incarnation[instance_id] = incarnation
            try:
                await self._start_instance(instance_id, incarnation)
                self.restarts += 1
                logger.info("instance %s restarted (incarnation %d)", instance_id, incarnation)
                return
            except Exception:
                logger.exception("restart of %s failed; retrying in %.1f s", instance_id, backoff * 2)
                backoff = min(max(backoff * 2, 0.5), _MAX_RESTART_BACKOFF_S)

    async def internal_token(self) -> SecretStr | None:
        """The token this pool's instances require, for a router joining the cluster later.

        Handing it out over Ray gives nothing away: whoever can call this actor can already run
        any code on the cluster (docs/security.md)."""
        return self._spec.internal_token

    async def membership(self) -> Membership:
        """The current membership snapshot."""
        return self._membership()

    async def watch(self, since_version: int, timeout_s: float = 30.0) -> Membership:
        """Return the membership once its version is above ``since_version`` (or at the timeout)."""
        if self._version <= since_version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self._membership()

    async def instance_handle(self, instance_id: str) -> Any:
        """The Ray actor handle of a live instance (for operations and tests), or None."""
        return self._actors.get(instance_id)

    async def restart_count(self) -> int:
        """How many instances were restarted since the supervisor started."""
        return self.restarts

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop every instance gracefully, then forget them."""
        self._stopping = True
        actors = list(self._actors.values())
        self._actors.clear()
        self._infos.clear()
        self._bump()
        await asyncio.gather(*(a.stop.remote(grace_s) for a in actors), return_exceptions=True)
        for task in [*self._watchers.values(), *self._draining.values()]:
            task.cancel()
        for actor in actors:
            ray.kill(actor, no_restart=True)


Supervisor: Any = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(_SupervisorImpl)


async def follow_membership(
    supervisor: Any, apply: Callable[[Membership], None], *, retry_s: float = 1.0
) -> None:
    """Feed every membership change of ``supervisor`` to ``apply`` until cancelled.

    Runs in the router's process; a supervisor that is briefly unreachable is retried rather
    than ending the router.
    """
    version = 0
    while True:
        try:
            membership: Membership = await supervisor.watch.remote(version)
        except RayActorError:
            logger.error("supervisor unreachable; retrying in %.1f s", retry_s)
            await asyncio.sleep(retry_s)
            continue
        if membership.version != version:
            version = membership.version
            apply(membership)
