"""The Ray actor that hosts one engine instance (Llumnix calls it a llumlet).

It stays thin on purpose: it builds one ``Engine``, serves it over the Worker gRPC service
(routers talk gRPC, never Ray, so a router needs no Ray to dispatch), and reports its own
death in a way the supervisor can await. Routing and migration logic live elsewhere.

Death detection: ``run_until_stopped`` never returns while the instance is healthy. The
supervisor keeps one call of it outstanding per actor; when the actor process dies (killed,
OOM, engine crash that ends the actor) the call raises ``RayActorError`` at once, with no
polling interval to wait out. When the engine dies but the process lives, the actor notices
through its own health loop and exits, which turns into the same signal.

Lifetime: the supervisor starts instances as *detached*, named actors (``adoption.InstanceName``),
not as actors it owns. Ray kills an owned actor with its owner, which made the supervisor a
single point of failure: one crash of it cut every stream of the pool. Detached, an instance
keeps serving while its supervisor is down; the supervisor Ray restarts finds it by name and
asks ``adoptable_info`` whether to adopt it. The price is that nothing stops a detached actor
implicitly, so whoever stops a pool kills its instances by name (``supervisor.kill_pool_instances``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from pydantic import SecretStr

from switchyard.config import EngineConfig
from switchyard.errors import ConfigError, EngineDeadError
from switchyard.messages import InstanceInfo
from switchyard.workers.engine import Engine

if TYPE_CHECKING:
    import grpc

logger = logging.getLogger(__name__)

__all__ = ["InstanceActor", "build_engine", "with_reachable_kv_endpoint"]

# How often the actor checks that its engine still serves; a dead engine is noticed within this.
_HEALTH_INTERVAL_S = 1.0


async def build_engine(cfg: EngineConfig, *, instance_id: str, model_dir: Path | None) -> Engine:
    """Start the engine ``cfg.kind`` names. vLLM is imported only when it is asked for."""
    if cfg.kind == "vllm":
        if model_dir is None:
            raise ConfigError("the vllm engine needs a model directory")
        from switchyard.workers.vllm.engine import VLLMEngine

        return await VLLMEngine.start(cfg, instance_id=instance_id, model_dir=model_dir)
    from switchyard.workers.sim.engine import SimEngine

    return SimEngine.from_config(cfg, instance_id=instance_id)


def with_reachable_kv_endpoint(cfg: EngineConfig, advertised_host: str) -> EngineConfig:
    """Point the NIXL handshake at the address peers reach this instance on.

    Why: the migration destination connects to the *source's* handshake address, which the
    source puts into the tickets it hands out. The loopback default works on one machine; on
    a cluster it would send every destination to itself, so a loopback value is replaced by
    the address the instance advertises (an explicitly configured routable host is kept).
    """
    kv = cfg.kv_transfer
    if kv is None or not kv.side_channel_host.startswith("127.") or advertised_host.startswith("127."):
        return cfg
    return cfg.model_copy(
        update={"kv_transfer": kv.model_copy(update={"side_channel_host": advertised_host})}
    )


class _InstanceActorImpl:
    """One engine plus its Worker gRPC server, inside a Ray actor process."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._server: grpc.aio.Server | None = None
        self._info: InstanceInfo | None = None
        self._stopped = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        self._token: str | None = None
        self._stopping = False

    async def start(
        self,
        cfg: EngineConfig,
        *,
        instance_id: str,
        incarnation: int,
        model_dir: str | None,
        host: str | None,
        served_model_name: str,
        role: str = "unified",
        internal_token: SecretStr | None = None,
    ) -> InstanceInfo:
        """Build the engine, serve it, and return the facts membership publishes.

        ``host`` is the address the Worker service binds and advertises; None takes this node's
        IP as Ray knows it (a Kubernetes worker pod's IP), so routers on other machines reach
        the instance. Both cases bind exactly the advertised address, never every interface:
        the port is internal, and an interface nobody is told about only widens who can reach it.

        ``internal_token``: what every call to the Worker service must carry (None: none)."""
        from switchyard.workers.worker_server import start_worker_server

        path = Path(model_dir) if model_dir else None
        self._token = internal_token.get_secret_value() if internal_token is not None else None
        bind = advertised = host or ray.util.get_node_ip_address()
        cfg = with_reachable_kv_endpoint(cfg, advertised)
        self._engine = await build_engine(cfg, instance_id=instance_id, model_dir=path)
        engine = self._engine

        def info_for(port: int) -> InstanceInfo:
            return InstanceInfo(
                instance_id=instance_id,
                address=f"{advertised}:{port}",
                model=served_model_name,
                engine=cfg.kind,
                role=role,
                block_size=engine.block_size,
                max_model_len=engine.max_model_len,
                incarnation=incarnation,
                kv_bytes_per_block=engine.kv_bytes_per_block,
            )

        self._server, port = await start_worker_server(
            engine, info_for, host=bind, port=0, token=internal_token
        )
        self._info = info_for(port)
        self._health_task = asyncio.create_task(self._watch_engine_health())
        logger.info(
            "instance %s (incarnation %d) serving on %s", instance_id, incarnation, self._info.address
        )
        return self._info

    async def run_until_stopped(self) -> None:
        """Returns only on a clean stop; raises RayActorError in the caller if the actor dies."""
        await self._stopped.wait()

    async def busy(self) -> bool:
        """Whether the engine still has requests (running or waiting); drains poll this."""
        if self._engine is None:
            return False
        report = self._engine.load()
        return report.num_running + report.num_waiting > 0

    async def adoptable_info(self, internal_token: SecretStr | None) -> InstanceInfo | None:
        """What this instance serves, if a supervisor holding ``internal_token`` may adopt it.

        None while the engine is still starting or the instance is stopping (the supervisor
        replaces it), and when the instance requires another token: the routers that supervisor
        serves would be refused by it.
        """
        token = internal_token.get_secret_value() if internal_token is not None else None
        if self._info is None or self._stopping or token != self._token:
            return None
        return self._info

    async def ping(self) -> str:
        """Liveness probe: the instance id once started."""
        return self._info.instance_id if self._info else ""

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving: the gRPC server first (in-flight streams get ``grace_s``), then the engine."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._engine is not None:
            await self._engine.close()
        self._stopped.set()

    async def _watch_engine_health(self) -> None:
        engine = self._engine
        assert engine is not None
        while True:
            await asyncio.sleep(_HEALTH_INTERVAL_S)
            try:
                await engine.check_health()
            except EngineDeadError:
                logger.error(
                    "engine of %s died; exiting so the supervisor restarts the instance",
                    self._info.instance_id if self._info else "?",
                )
                # A dead engine cannot be closed cleanly; ending the process is what turns into
                # the supervisor's death signal (and frees whatever the engine still holds).
                os._exit(1)


# ``ray.remote`` is applied here rather than as a decorator so the plain class stays importable
# and typed; num_cpus=0 because the engine's own processes do the work (and a 2-core machine
# must host several instances). Started detached (see the module docstring), never restarted by
# Ray: the supervisor decides about replacements, with a new incarnation and address.
InstanceActor: Any = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(_InstanceActorImpl)
