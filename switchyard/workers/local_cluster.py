"""Pools of engine instances on a local (or joined) Ray cluster, as one object.

``switchyard serve``, the router on Kubernetes and the integration tests need the same
sequence: start or join Ray with the environment the engines need, start one supervisor per
pool, start its instances, and follow their memberships. Keeping that here keeps Ray out of
the composition code above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from pydantic import SecretStr

from switchyard.api.auth import generate_token
from switchyard.cache import CACHE_DIR_VAR, cache_dir
from switchyard.errors import ConfigError
from switchyard.messages import Membership
from switchyard.workers.membership import MembershipMerger
from switchyard.workers.supervisor import PoolSpec, Supervisor, follow_membership, kill_pool_instances

logger = logging.getLogger(__name__)

__all__ = ["LocalPool", "engine_environment", "start_local_pool", "start_local_pools"]


def engine_environment(specs: Sequence[PoolSpec]) -> dict[str, str]:
    """Environment variables every Ray worker needs to host these pools' engines.

    Ray workers do not inherit changes the driver makes after start-up, so the variables
    travel in the job's ``runtime_env``.
    """
    env: dict[str, str] = {}
    for spec in specs:
        if spec.engine.kind == "vllm":
            from switchyard.workers.vllm.env import vllm_env

            env.update(vllm_env(spec.engine, cache_dir=cache_dir()))
    # Pass through an explicit cache location so restarted instances find the same models.
    if os.environ.get(CACHE_DIR_VAR):
        env[CACHE_DIR_VAR] = os.environ[CACHE_DIR_VAR]
    return env


@dataclass
class LocalPool:
    """Started pools: one supervisor each, and the tasks feeding membership to a router."""

    supervisors: dict[str, Any]
    memberships: dict[str, Membership]
    started_ray: bool
    owns_supervisors: bool = True
    """False on a joined cluster: supervisors are shared by every router and outlive this one."""
    internal_token: SecretStr | None = None
    """The token the pools' Worker services require; a router's clients must send it."""
    _follow_tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @property
    def supervisor(self) -> Any:
        """The supervisor of a single-pool deployment (tests and ``serve`` with one pool)."""
        if len(self.supervisors) != 1:
            raise ValueError(f"{len(self.supervisors)} pools; pick one from .supervisors")
        return next(iter(self.supervisors.values()))

    @property
    def membership(self) -> Membership:
        """All pools' instances as one membership snapshot (version: number of pools' changes)."""
        instances = sorted(
            (i for m in self.memberships.values() for i in m.instances), key=lambda i: i.instance_id
        )
        return Membership(
            version=sum(m.version for m in self.memberships.values()), instances=tuple(instances)
        )

    def follow(self, apply: Callable[[Membership], None]) -> None:
        """Feed ``apply`` the merged membership of every pool now and on every change."""
        merger = MembershipMerger(apply)
        for name, supervisor in self.supervisors.items():
            merger.update(name, self.memberships[name])
            self._follow_tasks.append(
                asyncio.create_task(follow_membership(supervisor, merger.updater(name)))
            )

    async def instance_handle(self, instance_id: str) -> Any:
        """Ray handle of one instance actor (tests kill it to exercise restarts), or None."""
        for supervisor in self.supervisors.values():
            handle = await supervisor.instance_handle.remote(instance_id)
            if handle is not None:
                return handle
        return None

    async def stop(self) -> None:
        """Stop following, stop every instance, and shut Ray down if this object started it.

        Bounded, because it runs while a process manager waits to SIGKILL us: a supervisor gets
        :data:`POOL_STOP_TIMEOUT_S` to stop its instances (then it is killed, and its instances
        with the Ray it runs on), and the processes of a Ray this object started get
        :data:`RAY_EXIT_WAIT_S` after ``ray.shutdown`` before they are killed. ``ray.shutdown``
        stops only Ray's daemons; its workers (and the engine processes they started) notice on
        their own, and were seen to outlive the driver by half a minute and more.

        Instance actors are detached (they outlive a supervisor that dies, so it can re-adopt
        them), so nothing kills them with their supervisor: after the supervisors, every instance
        of an owned pool still named in Ray is killed, whether or not Ray is shut down next.
        """
        for task in self._follow_tasks:
            task.cancel()
        for task in self._follow_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        owned = list(self.supervisors.values()) if self.owns_supervisors else []
        results = await asyncio.gather(
            *(asyncio.wait_for(s.stop.remote(), POOL_STOP_TIMEOUT_S) for s in owned), return_exceptions=True
        )
        for supervisor, result in zip(owned, results, strict=True):
            if isinstance(result, TimeoutError):
                logger.warning("a supervisor did not stop its instances within %.0f s", POOL_STOP_TIMEOUT_S)
            with contextlib.suppress(Exception):
                ray.kill(supervisor, no_restart=True)
        if owned and ray.is_initialized():
            pools = list(self.supervisors)
            try:
                leftovers = await asyncio.to_thread(kill_pool_instances, pools)
            except Exception:
                logger.exception("could not look for instances of pools %s left running", pools)
                leftovers = []
            if leftovers:
                logger.warning("killed instances their supervisor had not stopped: %s", ", ".join(leftovers))
        if self.started_ray:
            processes = _ray_processes()  # before the shutdown: afterwards the workers have no parent
            ray.shutdown()
            await _reap(processes, RAY_EXIT_WAIT_S)


SUPERVISOR_RESOURCES = {"node:__internal_head__": 0.001}
"""Where supervisors run: on the Ray head node, never on a worker node.

Why: a supervisor owns its pool's instance actors, and Ray kills the actors an actor owns when
it dies. A supervisor takes no CPU (``num_cpus=0``), so Ray was free to place it on any node;
one placed on a worker node that was then lost (a node killed in the fault-matrix test, a
preempted Kubernetes worker pod) took every instance of the pool with it, the ones on the
surviving nodes too, and the service answered 503 from then on. The head node holds the GCS:
if it goes, the whole cluster goes anyway, so pinning adds no failure. (Ray Train pins its
state actor the same way.)"""

POOL_STOP_TIMEOUT_S = 30.0
"""Longest wait for a supervisor to stop its instances on shutdown (a vLLM engine takes a few
seconds); past it the instances go down with Ray instead of in order."""

RAY_EXIT_WAIT_S = 5.0
"""How long the processes of a Ray this process started may take to exit after ``ray.shutdown``
before they are killed (they normally go within a second of their raylet)."""

RAY_START_ATTEMPTS = 3
"""Local Ray start-ups tried before giving up: Ray waits a fixed 30 s for its raylet to
register, which a loaded 2-core machine has been seen to miss (CI, once)."""


def _init_ray(specs: Sequence[PoolSpec], *, ray_address: str | None, num_cpus: int | None) -> None:
    """Start a local Ray (or join ``ray_address``); retry a local start that timed out.

    Joining is not retried: a wrong address should fail at once and loudly. Without
    ``ray_address`` a new local Ray always starts: ``switchyard serve`` joins a cluster only when
    told to (``--ray-address``). Ray's own default would join the cluster a ``ray start`` on this
    machine last recorded, or ``$RAY_ADDRESS``; a fault-matrix test that killed its Ray head left
    that record behind, and the next ``serve`` hung at start-up retrying the dead GCS.
    """
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            with _keep_signal_handlers(), _loopback_node(ray_address is None):
                ray.init(
                    # "local", not None: None joins whatever cluster the machine knows of
                    # (``RAY_ADDRESS``, or the last ``ray start`` recorded in
                    # /tmp/ray/ray_current_cluster, even a dead one, where start-up then hangs).
                    address=ray_address if ray_address is not None else "local",
                    num_cpus=num_cpus if ray_address is None else None,
                    include_dashboard=False,
                    namespace="switchyard",
                    runtime_env={"env_vars": engine_environment(specs)},
                    logging_level=logging.WARNING,
                    log_to_driver=True,
                )
            return
        except Exception as exc:
            if ray_address is not None or attempt == RAY_START_ATTEMPTS:
                raise
            logger.warning("local Ray start failed (attempt %d of %d), retrying: %s",
                           attempt, RAY_START_ATTEMPTS, exc)  # fmt: skip
            ray.shutdown()
            _kill_half_started_ray()


@contextlib.contextmanager
def _loopback_node(local: bool) -> Iterator[None]:
    """Start a local Ray (``local``) as a loopback-only node: every port it opens binds 127.0.0.1.

    Why: a Ray started on Linux takes the machine's routable IP as its node address and then
    binds its ports to it or to every interface: the metrics exporters of its dashboard agent,
    dashboard and autoscaler monitor (``0.0.0.0``), the GCS, raylet and worker gRPC servers
    (``::``), the agents' HTTP and gRPC ports. None of that is authenticated (docs/security.md),
    and a local ``serve`` is one machine that nobody else joins. Ray has no bind-address option
    for these; each binds loopback exactly when the node address is a loopback one, which Ray
    picks only where multi-node clusters are off (its macOS/Windows default,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). That setting is read into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` when Ray is imported, so it is switched
    off here for the start-up alone; the daemons get the loopback address from the driver on
    their command lines. A joined cluster (Kubernetes) is left as it is: its nodes must reach
    each other.
    """
    constants = ray._private.ray_constants
    if not local or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


_SIGNALS_KEPT = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Keep the SIGTERM/SIGINT handlers this process installed in place while Ray starts.

    ``ray.init`` replaces the process's SIGTERM handling twice: in Python (a handler that calls
    ``sys.exit``) and, when its core worker starts, in C++ (a crash handler that dumps a stack
    and aborts). In ``switchyard serve`` that replaced the event loop's handler: on SIGTERM a
    ``SystemExit`` surfaced wherever the loop happened to be (or the process aborted), streams
    were cut without an error event, nothing was stopped in order, and Ray's agents outlived the
    process by a minute.

    So while Ray starts its daemons (seconds), its Python installer
    (``ray._private.utils.set_sigterm_handler``) does nothing, and a SIGTERM arriving then
    reaches the loop once ``ray.init`` returns; afterwards the process's handlers are installed
    again, unconditionally, since Python cannot see the C++ one (``signal.getsignal`` still
    reports the old handler). Only handlers the process installed itself are kept: one that
    had none (a library user) keeps Ray's, which at least cleans Ray up.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers, and Ray sets none from elsewhere
        return
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS_KEPT}
    own = {sig: handler for sig, handler in before.items() if handler not in (None, signal.SIG_DFL)}
    utils = ray._private.utils
    installer = getattr(utils, "set_sigterm_handler", None)
    if signal.SIGTERM in own and installer is not None:
        utils.set_sigterm_handler = _ignore_ray_handler
    try:
        yield
    finally:
        if installer is not None:
            utils.set_sigterm_handler = installer
        for sig, handler in own.items():
            signal.signal(sig, handler)


def _ignore_ray_handler(handler: Callable[..., Any]) -> None:
    logger.debug("not installing Ray's SIGTERM handler %r: the process has its own", handler)


_RAY_DAEMONS = frozenset({"gcs_server", "raylet"})


def _ray_processes() -> list[Any]:
    """The processes of the Ray this process started: its daemons and everything below them.

    Ray's daemons are this process's children (the GCS, the raylet, Python scripts of the
    ``ray`` package: monitor, log monitor, dashboard, reaper); its workers, their agents and the
    engine processes the workers start are the raylet's descendants.
    """
    import psutil  # type: ignore[import-untyped]  # ships with vLLM and Ray

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    found: dict[int, Any] = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() in _RAY_DAEMONS or any(arg.startswith(ray_dir) for arg in child.cmdline()):
                found[child.pid] = child
                found.update((p.pid, p) for p in child.children(recursive=True))
    return list(found.values())


async def _reap(processes: Sequence[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``processes`` to exit, then kill the rest (logged)."""
    import psutil

    alive = await asyncio.to_thread(_wait_gone, processes, timeout_s)
    names = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            names.append(proc.name())
            proc.kill()
    if names:
        logger.warning("killed %d Ray processes still running %.0f s after ray.shutdown: %s",
                       len(names), timeout_s, ", ".join(sorted(names)))  # fmt: skip
        await asyncio.to_thread(_wait_gone, alive, 5.0)


def _wait_gone(processes: Sequence[Any], timeout_s: float) -> list[Any]:
    """Poll until every process has exited or ``timeout_s`` passed; the ones still running.

    A zombie counts as gone (``psutil.wait_procs`` would wait for it): it holds no memory, and
    one whose new parent reaps nothing (a container's PID 1) would never disappear.
    """
    import psutil

    def running(proc: Any) -> bool:
        try:
            return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout_s
    alive = [p for p in processes if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if running(p)]
    return alive


def _kill_half_started_ray() -> None:
    """Kill the GCS, raylet and reaper a failed local start left behind.

    Ray raises from inside its node's constructor, so the half-built node is never recorded
    and ``ray.shutdown`` cannot reach its processes; they would hold CPU and memory until this
    process exits. Only called while this process runs no Ray, so every such child is stale.
    """
    import psutil

    stale = _ray_processes()
    for proc in stale:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(stale, timeout=10)


def _kill_stale_pool(pool: str) -> None:
    """Remove the supervisor of ``pool``, and its instances, left in this process's own Ray by an
    owner that died.

    Only for a Ray this process owns (not a joined cluster, whose named supervisors are
    shared on purpose): an owner killed mid-start (a test past its timeout) skips its
    ``stop``, and the leftover name would make every later start fail. Its instances are
    detached and would outlive it; they serve a pool this owner no longer knows (and require
    the old owner's token), so they are killed rather than adopted.
    """
    name = f"supervisor-{pool}"
    try:
        stale = ray.get_actor(name, namespace="switchyard")
    except ValueError:
        stale = None
    if stale is not None:
        logger.warning("killing stale supervisor %s left by an earlier owner in this process", name)
        ray.kill(stale, no_restart=True)
    leftovers = kill_pool_instances([pool])
    if leftovers:
        logger.warning("killed instances left by an earlier owner in this process: %s", ", ".join(leftovers))


async def _cluster_token(specs: Sequence[PoolSpec], given: SecretStr | None, *, shared: bool) -> SecretStr:
    """The internal token the pools' instances will require.

    Locally: ``given``, else a fresh random one. On a joined cluster the pools may already run,
    started by another router replica (or by this router before it restarted) with the token it
    had; their instances accept nothing else. So a router that was given no token adopts theirs
    (a generated one must survive router restarts and be shared by replicas), and one given a
    different token is refused here, with what to do, instead of failing every request later.
    """
    running: dict[str, str] = {}
    for spec in specs if shared else ():
        try:
            supervisor = ray.get_actor(f"supervisor-{spec.name}", namespace="switchyard")
        except ValueError:
            continue  # not running yet: this router starts it
        try:
            token: SecretStr | None = await supervisor.internal_token.remote()
        except Exception as exc:  # a supervisor of an older version: its instances take no token
            logger.warning("cannot ask supervisor-%s for its internal token (%r)", spec.name, exc)
            continue
        if token is not None:
            running[spec.name] = token.get_secret_value()
    distinct = set(running.values())
    if given is not None:
        other = sorted(name for name, value in running.items() if value != given.get_secret_value())
        if other:
            raise ConfigError(
                f"pools {other} already run on this Ray cluster with another internal token, so their "
                "instances would refuse this router: give it the token they were started with (the same "
                "Secret as the other router replicas), or stop those pools first"
            )
        return given
    if len(distinct) > 1:
        raise ConfigError(
            f"pools {sorted(running)} run on this Ray cluster with different internal tokens; "
            "one router cannot reach them all: restart them with one token (internal_token)"
        )
    if distinct:
        logger.info(
            "using the internal token of pools %s, already running on this Ray cluster", sorted(running)
        )
        return SecretStr(distinct.pop())
    return generate_token()


async def start_local_pools(
    specs: Sequence[PoolSpec],
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    internal_token: SecretStr | None = None,
) -> LocalPool:
    """Start (or join) Ray, start a supervisor per pool and wait until every instance serves.

    Every instance requires an internal token (``LocalPool.internal_token``): ``internal_token``,
    else on a joined cluster the one its running pools already use, else a fresh random one; a
    joined cluster whose pools use another token than the one given raises ``ConfigError``.
    """
    started = False
    if not ray.is_initialized():
        _init_ray(specs, ray_address=ray_address, num_cpus=num_cpus)
        started = True
    # On a joined cluster (Kubernetes) every router replica attaches to the same detached,
    # named supervisors and brings them to its spec; the first one starts the instances.
    shared = ray_address is not None
    # Whatever this call started is undone by the pool's own stop if the start fails or is
    # cancelled (SIGTERM while the engines load): its supervisors, then the Ray it started.
    pool = LocalPool(supervisors={}, memberships={}, started_ray=started, owns_supervisors=not shared)
    try:
        given = internal_token or next((s.internal_token for s in specs if s.internal_token), None)
        pool.internal_token = token = await _cluster_token(specs, given, shared=shared)
        specs = [s.model_copy(update={"internal_token": token}) for s in specs]
        options: dict[str, Any] = {"lifetime": "detached", "get_if_exists": True} if shared else {}
        if not shared:
            for spec in specs:
                _kill_stale_pool(spec.name)
        supervisors = pool.supervisors
        for s in specs:
            supervisors[s.name] = Supervisor.options(
                name=f"supervisor-{s.name}", resources=SUPERVISOR_RESOURCES, **options
            ).remote(s)
        if shared:
            await asyncio.gather(
                *(sup.apply.remote(s) for s, sup in zip(specs, supervisors.values(), strict=True))
            )
        results = await asyncio.gather(
            *(sup.start.remote() for sup in supervisors.values()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    except BaseException:
        await pool.stop()
        raise
    pool.memberships = {
        name: m for name, m in zip(supervisors, results, strict=True) if isinstance(m, Membership)
    }
    return pool


async def start_local_pool(
    spec: PoolSpec,
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    internal_token: SecretStr | None = None,
) -> LocalPool:
    """``start_local_pools`` for a single pool."""
    return await start_local_pools(
        [spec], ray_address=ray_address, num_cpus=num_cpus, internal_token=internal_token
    )
