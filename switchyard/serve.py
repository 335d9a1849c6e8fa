"""``switchyard serve``: engines, router and gateway on one machine, in one command.

The composition root. It resolves the model (building the tiny smoke-test model when none is
given), starts the engine pool on Ray, starts the router core and its gRPC service, puts the
OpenAI gateway in front, and on cancellation (Ctrl-C or SIGTERM) stops them in reverse order
so that no request is left running on an engine: open requests get ``shutdown_grace_s``, then
end with an error, then the router, the engines and the Ray this process started stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from switchyard.config import EngineConfig, ServeConfig
from switchyard.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["RunningStack", "given_internal_token", "resolve_model", "run_serve", "start_stack"]


def resolve_model(config: ServeConfig) -> tuple[Path, str, bool]:
    """Return (model dir, served model name, is the tiny smoke-test model).

    The simulator produces token IDs, not text from a model, but the gateway still needs a
    tokenizer and chat template: it uses the tiny model's, which is built locally in seconds.
    """
    from switchyard.testing.tiny_model import TINY_MODEL_NAME, build_tiny_model

    model = config.engine.model
    if model is None:
        path, tiny = build_tiny_model(), True
        default_name = TINY_MODEL_NAME if config.engine.kind == "vllm" else "switchyard-sim"
    else:
        path, tiny = model.expanduser().resolve(), False
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model {model}: not a Hugging Face model directory (no config.json in {path})"
            )
        default_name = path.name
    return path, config.engine.served_model_name or default_name, tiny


@dataclass
class RunningStack:
    """Handles of everything ``start_stack`` started, for tests and for shutdown."""

    core: Any
    pool: Any
    gateway_server: Any
    gateway_task: asyncio.Task[Any]
    gateway_port: int
    router_server: Any
    router_port: int
    model_name: str
    internal_token: SecretStr | None = None
    """The token the router's and the workers' gRPC services require (generated when none was given)."""

    async def stop(self) -> None:
        """Stop accepting (gateway, router gRPC), then the router core, then the engines.

        The gateway's stop takes up to ``ServeConfig.shutdown_grace_s`` (open requests finish or
        end with an error event); only then is the core closed, so no open stream is cut silently
        by the instances going away underneath it.
        """
        from switchyard.router.gateway import stop_gateway

        with contextlib.suppress(Exception):
            await stop_gateway(self.gateway_server, self.gateway_task)
        with contextlib.suppress(Exception):
            await self.router_server.stop(2.0)
        with contextlib.suppress(Exception):
            await self.core.close()
        await self.pool.stop()


def given_internal_token(config: ServeConfig) -> SecretStr | None:
    """The internal token ``config`` gives (inline or in ``internal_token_file``), or None.

    None lets ``start_local_pools`` pick one (a joined cluster's, or a fresh random one), so a
    local ``switchyard serve`` is authenticated with no setup.
    """
    if config.internal_token is not None:
        return config.internal_token
    if config.internal_token_file is not None:
        from switchyard.api.auth import read_token_file

        return read_token_file(config.internal_token_file)
    return None


def _engine_for(engine: EngineConfig, *, vocab_size: int) -> EngineConfig:
    """The simulator emits token IDs the gateway must detokenize: keep them in the tokenizer's range."""
    if engine.kind != "sim":
        return engine
    return engine.model_copy(update={"sim": engine.sim.model_copy(update={"vocab_size": vocab_size})})


async def start_stack(config: ServeConfig) -> RunningStack:
    """Start the whole local stack and return once the gateway accepts requests."""
    from switchyard.router.core import RouterCore
    from switchyard.router.gateway import TokenizerAdapter, build_gateway_app, serve_gateway
    from switchyard.router.grpc_server import start_router_server
    from switchyard.workers.local_cluster import start_local_pools
    from switchyard.workers.supervisor import PoolSpec

    model_dir, model_name, tiny = resolve_model(config)
    if tiny and config.engine.kind == "vllm":
        logger.warning(
            "no --model given: serving %s, a tiny RANDOM-WEIGHT smoke-test model built in %s; "
            "its output is gibberish. Pass --model DIR to serve a real model.",
            model_name,
            model_dir,
        )
    if config.engine.kind == "sim":
        logger.warning(
            "--engine sim: serving the SIMULATOR (a performance model, no inference); token IDs are synthetic"
        )
    tokenizer = await asyncio.to_thread(TokenizerAdapter.from_model_dir, model_dir)
    vocab_size = tokenizer.vocab_size
    specs = []
    for pool_config in config.effective_pools():
        spec = PoolSpec.from_config(pool_config, config, model_dir=model_dir, served_model_name=model_name)
        specs.append(spec.model_copy(update={"engine": _engine_for(spec.engine, vocab_size=vocab_size)}))
    pool = await start_local_pools(
        specs,
        ray_address=config.ray_address,
        num_cpus=config.ray_num_cpus,
        internal_token=given_internal_token(config),
    )
    # The pools decided the token (the one given, a joined cluster's, or a fresh one): the
    # router's clients send it and the router's own gRPC service requires it.
    token = pool.internal_token
    core = RouterCore(config.router, internal_token=token)
    try:
        await core.start()
        pool.follow(core.apply_membership)
        router_server, router_port = await start_router_server(
            core, host=config.router.grpc_host, port=config.router.grpc_port, token=token
        )
        app = build_gateway_app(core, tokenizers={model_name: tokenizer}, config=config.gateway)
        gateway_server, gateway_task, gateway_port = await serve_gateway(
            app, config.gateway, graceful_shutdown_s=config.shutdown_grace_s
        )
    except BaseException:
        await core.close()
        await pool.stop()
        raise
    return RunningStack(
        core=core,
        pool=pool,
        gateway_server=gateway_server,
        gateway_task=gateway_task,
        gateway_port=gateway_port,
        router_server=router_server,
        router_port=router_port,
        model_name=model_name,
        internal_token=token,
    )


@contextlib.asynccontextmanager
async def running_stack(config: ServeConfig) -> AsyncIterator[RunningStack]:
    """``start_stack`` as a context manager that always stops what it started."""
    stack = await start_stack(config)
    try:
        yield stack
    finally:
        await stack.stop()


async def run_serve(config: ServeConfig) -> int:
    """Serve until cancelled (the CLI cancels on SIGINT/SIGTERM), then shut down cleanly."""
    async with running_stack(config) as stack:
        host = config.gateway.host
        given = config.internal_token is not None or config.internal_token_file is not None
        token_note = (
            "" if given or config.ray_address else ", generated: set SWITCHYARD_INTERNAL_TOKEN to use it"
        )
        print(
            f"Switchyard serving model '{stack.model_name}' on {len(stack.core.membership.instances)} "
            f"{config.engine.kind} instance(s), policy {config.router.policy}\n"
            f"  OpenAI API:  http://{host}:{stack.gateway_port}/v1\n"
            f"  metrics:     http://{host}:{stack.gateway_port}/metrics\n"
            f"  router gRPC: {config.router.grpc_host}:{stack.router_port} "
            f"(bearer: the internal token{token_note})\n"
            f"Press Ctrl-C (or send SIGTERM) to stop.",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            logger.info(
                "stopping: open requests get %g s (shutdown_grace_s), then the router and the engines stop",
                config.shutdown_grace_s,
            )
    return 0
