"""The supervisor: keeps a pool's engine instances alive and publishes who they are.

One supervisor (a Ray actor) per pool starts N instance actors, notices when one dies, starts
a replacement (same instance id, next incarnation) after a back-off, and keeps a versioned
membership that routers follow by long-polling ``watch``. Long-polling instead of pushing
means routers can come and go (several replicas, restarts) without the supervisor knowing
them, and a router that missed versions simply gets the latest snapshot.

Surviving its own death (issue #16 item 4). The supervisor is not on the request path: routers
stream from instances over gRPC. It may therefore die and come back, provided the instances
do not die with it, which used to be the case (Ray kills the actors an actor owns with it, so
one crash of the supervisor ended every stream of the pool and left routers with no instances
for good). Now:

* instances are detached, named actors (``adoption.InstanceName``), so they outlive the
  supervisor, and the supervisor is restartable (``max_restarts=-1``);
* a supervisor, on every (re)start, looks its pool's instances up by name and adopts the
  serving ones as they are (same id, incarnation and address, so routers see no change and keep
  their drain marks), drains surplus ones, kills stragglers and starts what is missing
  (``adoption.plan_adoption``);
* Ray re-runs ``__init__`` with the original constructor arguments, which would forget a later
  ``apply``; so the spec in force is recorded in Ray's GCS key-value store (it lives exactly as
  long as the cluster) with this actor's id, and a restarted incarnation (same actor id)
  resumes from it. The token is not written there: the constructor's is the instances' one.
  A new supervisor actor (another id) ignores the record and waits for ``start`` as before.

While the supervisor is down, routers keep their last membership and keep streaming; only
instance replacement and scaling wait for it. Detached actors are never stopped implicitly, so
stopping a pool kills its instances by name (``kill_pool_instances``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import ray
from pydantic import Field, SecretStr, ValidationError
from ray.exceptions import RayActorError, RayError

from switchyard.config import EngineConfig, InternalToken, PoolConfig, ServeConfig, StrictModel
from switchyard.errors import EngineDeadError
from switchyard.messages import InstanceInfo, Membership
from switchyard.workers.adoption import FoundInstance, InstanceName, plan_adoption
from switchyard.workers.instance_actor import InstanceActor

logger = logging.getLogger(__name__)

__all__ = ["PoolSpec", "Supervisor", "SupervisorRecord", "follow_membership", "kill_pool_instances"]

# Cap of the exponential back-off between failed restarts: a crash-looping instance costs
# one start attempt per minute, not a spinning CPU.
_MAX_RESTART_BACKOFF_S = 60.0

ADOPT_TIMEOUT_S = 10.0
"""How long a (re)started supervisor waits for a running instance to say what it serves before
it counts the instance as hung, kills it and starts a replacement."""


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


class SupervisorRecord(StrictModel):
    """What a restarted supervisor resumes from, kept in Ray's GCS key-value store.

    Ray restarts an actor by re-running ``__init__`` with its original arguments: the spec of
    a later ``apply`` and the incarnations handed out would be lost. Incarnations matter because
    an instance that died while the supervisor was down is not found by name any more, and its
    replacement must still get a higher incarnation than every earlier one. The internal token
    is never written here (the constructor's is the one the instances hold).
    """

    actor_id: str
    """The supervisor actor that wrote it: a new actor for the pool (another id) ignores it."""
    spec: PoolSpec
    incarnations: dict[str, int] = Field(default_factory=dict)
    """Highest incarnation started per instance id."""

    def dump(self) -> str:
        """JSON without the token."""
        return self.model_dump_json(exclude={"spec": {"internal_token"}})


class _SupervisorImpl:
    def __init__(self, spec: PoolSpec) -> None:
        self._spec = spec
        self._actors: dict[str, Any] = {}
        self._infos: dict[str, InstanceInfo] = {}
        self._incarnation: dict[str, int] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        # Versions start at the wall clock, so a restarted supervisor's exceed every version its
        # previous incarnation published, and a router's ``since_version`` never hides its
        # membership (it makes far fewer than one change per nanosecond).
        self._version = time.time_ns()
        self._changed = asyncio.Event()
        self._stopping = False
        self._started = False
        self._draining: dict[str, asyncio.Task[None]] = {}
        self.restarts = 0
        self._recovery: asyncio.Task[None] | None = None
        self._record_lock = asyncio.Lock()
        with contextlib.suppress(RuntimeError):  # no loop: built outside a Ray actor (unit tests)
            # Started here, not on the first call, so a restarted supervisor replaces instances
            # that died while it was down even before any router asks it anything.
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _bump(self) -> None:
        self._version += 1
        # Waking every waiter and replacing the event keeps ``watch`` free of lost wake-ups.
        self._changed.set()
        self._changed = asyncio.Event()

    def _membership(self) -> Membership:
        return Membership(version=self._version, instances=tuple(self._infos[k] for k in sorted(self._infos)))

    def _next_incarnation(self, instance_id: str) -> int:
        return self._incarnation.get(instance_id, -1) + 1

    async def _recovered(self) -> None:
        """Wait until the instances already running have been adopted (every entry point does).

        A recovery that failed (Ray's GCS unreachable, say) is tried again by the next call, and
        its error reaches the caller meanwhile: answering with an empty membership instead would
        make routers drop instances that are serving. ``follow_membership`` retries.
        """
        task = self._recovery
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._recovery = asyncio.create_task(self._recover())
        await asyncio.shield(task)

    async def _recover(self) -> None:
        """Resume the recorded spec if this is a restart of this actor, then adopt the running
        instances."""
        if not ray.is_initialized():
            return  # not a Ray actor: nothing can be running
        raw = await asyncio.to_thread(_read_record, self._spec.name)
        saved = None
        try:
            saved = SupervisorRecord.model_validate_json(raw) if raw is not None else None
        except ValidationError:
            # Written by another version: resume as a new supervisor would (adopt what serves).
            logger.warning("supervisor of pool %s: ignoring an unreadable record", self._spec.name)
        if saved is not None and saved.actor_id == ray.get_runtime_context().get_actor_id():
            self._spec = saved.spec.model_copy(update={"internal_token": self._spec.internal_token})
            self._incarnation.update(saved.incarnations)
            self._started = True
            logger.warning("supervisor of pool %s restarted; adopting its instances", self._spec.name)
        try:
            await self._adopt()
        except Exception:
            logger.exception("supervisor of pool %s: adopting its running instances failed", self._spec.name)
            raise

    async def _adopt(self) -> None:
        found, handles = await self._find_instances()
        plan = plan_adoption(found, pool=self._spec.name, instances=self._spec.instances)
        for f in plan.kill:
            ray.kill(handles[f.name], no_restart=True)
        for iid, incarnation in plan.last_incarnation.items():
            self._incarnation[iid] = max(self._incarnation.get(iid, incarnation), incarnation)
        for f in plan.adopt:
            assert f.info is not None
            self._register(f.name.instance_id, handles[f.name], f.info, bump=False)
        for f in plan.drain:
            iid = f.name.instance_id
            self._draining[iid] = asyncio.create_task(self._drain_and_stop(iid, handles[f.name]))
        if plan.adopt:
            self._bump()
        if found:
            logger.info(
                "pool %s: adopted %d running instance(s), draining %d, stopped %d",
                self._spec.name, len(plan.adopt), len(plan.drain), len(plan.kill),
            )  # fmt: skip
        if self._started:  # a restart: nobody will call start() again, so replace the missing now
            for iid in plan.missing:
                self._watchers[iid] = asyncio.create_task(self._restart(iid, first_wait_s=0.0))

    async def _find_instances(self) -> tuple[list[FoundInstance], dict[InstanceName, Any]]:
        """This pool's named instance actors, each with what it serves (None: not adoptable)."""
        names = await asyncio.to_thread(ray.util.list_named_actors)
        handles: dict[InstanceName, Any] = {}
        for name in names:
            parsed = InstanceName.parse(name)
            if parsed is None or parsed.pool != self._spec.name:
                continue
            with contextlib.suppress(ValueError):  # gone since the listing
                handles[parsed] = await asyncio.to_thread(ray.get_actor, name)
        infos = await asyncio.gather(*(self._adoptable_info(h) for h in handles.values()))
        return [FoundInstance(n, i) for n, i in zip(handles, infos, strict=True)], handles

    async def _adoptable_info(self, actor: Any) -> InstanceInfo | None:
        try:
            info: InstanceInfo | None = await asyncio.wait_for(
                actor.adoptable_info.remote(self._spec.internal_token), ADOPT_TIMEOUT_S
            )
        except (RayActorError, TimeoutError):
            return None
        return info

    async def _save_record(self) -> None:
        """Record the spec in force and the incarnations, for a restart of this actor (once started)."""
        if self._stopping or not (self._started and ray.is_initialized()):
            return  # stopping: the record is deleted, and must stay so
        async with self._record_lock:  # one write at a time, so an older snapshot never lands last
            record = SupervisorRecord(
                actor_id=ray.get_runtime_context().get_actor_id() or "",
                spec=self._spec,
                incarnations=dict(self._incarnation),
            )
            await asyncio.to_thread(_write_record, self._spec.name, record.dump())

    def _register(self, instance_id: str, actor: Any, info: InstanceInfo, *, bump: bool = True) -> None:
        self._actors[instance_id] = actor
        self._infos[instance_id] = info
        self._incarnation[instance_id] = max(self._incarnation.get(instance_id, 0), info.incarnation)
        self._watchers[instance_id] = asyncio.create_task(self._watch_instance(instance_id, actor))
        if bump:
            self._bump()

    async def start(self) -> Membership:
        """Start every instance; raises the first start failure (nothing left running then).

        Instances already serving (left by a supervisor of this pool that died) are adopted
        rather than started again. Idempotent: a supervisor shared by several routers (a
        detached, named actor on a joined Ray cluster) is started by the first and merely
        returns its membership to the others.
        """
        await self._recovered()
        if self._started:
            return self._membership()
        self._started = True
        await self._save_record()
        ids = [f"{self._spec.name}-{i}" for i in range(self._spec.instances)]
        missing = [i for i in ids if i not in self._actors]
        results = await asyncio.gather(
            *(self._start_instance(i, self._next_incarnation(i)) for i in missing), return_exceptions=True
        )
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
        await self._recovered()
        # The token stays the one the running instances were started with; start_local_pools
        # refuses a router that brings another, so this only fills in a spec that has none.
        self._spec = spec.model_copy(update={"internal_token": self._spec.internal_token})
        if not self._started:
            return self._membership()
        await self._save_record()
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
        await asyncio.gather(*(self._start_instance(i, self._next_incarnation(i)) for i in missing))
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
        # Detached: the instance must outlive this supervisor (module docstring); named, so a
        # restarted supervisor finds it.
        name = InstanceName(instance_id, incarnation)
        options: dict[str, Any] = {"name": str(name), "lifetime": "detached"}
        resources: dict[str, float] = {}
        if spec.ray_resource:
            resources[spec.ray_resource] = 1
        if spec.instance_resource:
            index = int(instance_id.rsplit("-", 1)[1])
            resources[spec.instance_resource.format(index=index)] = 1
        if resources:
            options["resources"] = resources
        self._incarnation[instance_id] = max(self._incarnation.get(instance_id, incarnation), incarnation)
        await self._save_record()
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
        self._register(instance_id, actor, info)

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

    async def _restart(self, instance_id: str, first_wait_s: float | None = None) -> None:
        """Start ``instance_id`` again, after ``first_wait_s`` (default: the spec's back-off),
        doubling the wait after each failed attempt."""
        backoff = self._spec.restart_backoff_s
        wait = backoff if first_wait_s is None else first_wait_s
        while not self._stopping:
            await asyncio.sleep(wait)
            incarnation = self._next_incarnation(instance_id)
            try:
                await self._start_instance(instance_id, incarnation)
                self.restarts += 1
                logger.info("instance %s restarted (incarnation %d)", instance_id, incarnation)
                return
            except Exception:
                logger.exception("restart of %s failed; retrying in %.1f s", instance_id, backoff * 2)
                backoff = min(max(backoff * 2, 0.5), _MAX_RESTART_BACKOFF_S)
                wait = backoff

    async def internal_token(self) -> SecretStr | None:
        """The token this pool's instances require, for a router joining the cluster later.

        Handing it out over Ray gives nothing away: whoever can call this actor can already run
        any code on the cluster (docs/security.md)."""
        return self._spec.internal_token

    async def membership(self) -> Membership:
        """The current membership snapshot."""
        await self._recovered()
        return self._membership()

    async def watch(self, since_version: int, timeout_s: float = 30.0) -> Membership:
        """Return the membership once its version is above ``since_version`` (or at the timeout)."""
        await self._recovered()
        if self._version <= since_version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self._membership()

    async def instance_handle(self, instance_id: str) -> Any:
        """The Ray actor handle of a live instance (for operations and tests), or None."""
        await self._recovered()
        return self._actors.get(instance_id)

    async def restart_count(self) -> int:
        """How many instances this incarnation of the supervisor restarted."""
        return self.restarts

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop every instance gracefully, then forget them (and the recorded spec)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._recovered(), ADOPT_TIMEOUT_S)
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
        if ray.is_initialized():
            # Detached instances die only when killed: also those this supervisor never adopted
            # (mid-start when it restarted, say).
            await asyncio.to_thread(kill_pool_instances, [self._spec.name])


# Restartable without limit: a restart costs nothing but the adoption above, and a supervisor
# that stays dead freezes its pool's membership. Calls in flight when it dies fail (no retries);
# routers' ``follow_membership`` simply asks again.
Supervisor: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)(
    _SupervisorImpl
)


def kill_pool_instances(pools: Collection[str]) -> list[str]:
    """Kill every instance actor of ``pools`` in this Ray namespace and forget their recorded specs;
    the names killed. Blocking (Ray's GCS calls): run it off the event loop.

    Why: instances are detached, so only this kills those a supervisor did not stop itself
    (dead, hung past its stop timeout, or an instance mid-start). Stopping a pool calls it.
    """
    from ray.experimental import internal_kv

    killed = []
    for name in ray.util.list_named_actors():
        parsed = InstanceName.parse(name)
        if parsed is None or parsed.pool not in pools:
            continue
        with contextlib.suppress(ValueError):  # gone since the listing
            ray.kill(ray.get_actor(name), no_restart=True)
            killed.append(name)
    for pool in pools:
        internal_kv._internal_kv_del(_record_key(pool))
    return killed


def _record_key(pool: str) -> str:
    return f"switchyard/supervisor/{ray.get_runtime_context().namespace}/{pool}"


def _write_record(pool: str, data: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_record_key(pool), data, overwrite=True)


def _read_record(pool: str) -> bytes | None:
    from ray.experimental import internal_kv

    raw: bytes | None = internal_kv._internal_kv_get(_record_key(pool))
    return raw


async def follow_membership(
    supervisor: Any, apply: Callable[[Membership], None], *, retry_s: float = 1.0
) -> None:
    """Feed every membership change of ``supervisor`` to ``apply`` until cancelled.

    Runs in the router's process; a supervisor that is briefly unreachable (Ray restarting it)
    is retried rather than ending the router, which keeps the last membership meanwhile: the
    instances outlive the supervisor and keep serving.
    """
    version = 0
    while True:
        try:
            membership: Membership = await supervisor.watch.remote(version)
        except RayActorError:
            logger.warning("supervisor unreachable (restarting?); retrying in %.1f s", retry_s)
            await asyncio.sleep(retry_s)
            continue
        except RayError as exc:  # it runs but cannot answer yet (its recovery failed): ask again
            logger.warning("supervisor failed to answer (%s); retrying in %.1f s", exc, retry_s)
            await asyncio.sleep(retry_s)
            continue
        if membership.version != version:
            version = membership.version
            apply(membership)
