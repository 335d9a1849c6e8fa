"""``PoolSpec.from_config``: what a supervisor runs is its ``PoolConfig`` plus serve's start-up facts."""

from __future__ import annotations

from pathlib import Path

from switchyard.config import EngineConfig, PoolConfig, ServeConfig
from switchyard.workers.supervisor import PoolSpec

MODEL = Path("/models/m")


def test_pool_spec_is_the_pool_config_plus_what_serve_decides() -> None:
    """Every PoolConfig field carries over unchanged; the engine falls back to the service-wide
    one; timeouts come from the ServeConfig; a joined Ray cluster makes instances bind all
    interfaces; only vLLM engines get the model directory."""
    config = ServeConfig(
        engine=EngineConfig(kind="vllm", max_num_seqs=8),
        pools=(
            PoolConfig(
                name="decode",
                role="decode",
                instances=3,
                ray_resource="pool-decode",
                instance_resource="decode-worker-{index}",
            ),
            PoolConfig(name="sim", engine=EngineConfig(kind="sim")),
        ),
        restart_backoff_s=2.0,
        instance_start_timeout_s=30.0,
        ray_address="ray://head:10001",
    )
    decode, sim = (
        PoolSpec.from_config(p, config, model_dir=MODEL, served_model_name="m") for p in config.pools
    )
    shared = set(PoolConfig.model_fields) - {"engine"}
    assert decode.model_dump(include=shared) == config.pools[0].model_dump(include=shared)
    assert (decode.name, decode.role, decode.instances) == ("decode", "decode", 3)
    assert (decode.ray_resource, decode.instance_resource) == ("pool-decode", "decode-worker-{index}")
    assert decode.engine == config.engine and sim.engine == EngineConfig(kind="sim")
    assert (decode.model_dir, sim.model_dir) == (str(MODEL), None)
    assert (decode.served_model_name, decode.restart_backoff_s, decode.start_timeout_s) == ("m", 2.0, 30.0)
    assert decode.host is None  # instances on other machines must be reachable from the router


def test_local_serve_binds_instances_to_loopback() -> None:
    """Without a Ray address everything runs on this machine: instances listen on loopback."""
    (pool,) = ServeConfig(engine=EngineConfig(kind="sim"), instances=2).effective_pools()
    spec = PoolSpec.from_config(pool, ServeConfig(), model_dir=None, served_model_name="m")
    assert (spec.name, spec.instances, spec.host, spec.model_dir) == ("pool", 2, "127.0.0.1", None)
    assert spec.engine.kind == "sim"
