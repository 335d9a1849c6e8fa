"""A stack whose instances do not start in time fails at once and leaves nothing behind.

Real Ray and simulated engines; the start deadline is set below what a Ray actor needs to
come up, so every instance start times out.
"""

from __future__ import annotations

import psutil  # type: ignore[import-untyped]
import pytest
import ray

from switchyard.config import EngineConfig, GatewayConfig, ServeConfig
from switchyard.errors import EngineDeadError
from switchyard.serve import start_stack

pytestmark = [pytest.mark.ray, pytest.mark.asyncio]


async def test_instances_past_the_start_deadline_fail_the_start_and_stop_ray() -> None:
    config = ServeConfig(
        engine=EngineConfig(kind="sim"),
        instances=2,
        gateway=GatewayConfig(port=0),
        ray_num_cpus=2,
        instance_start_timeout_s=0.001,
    )
    with pytest.raises(EngineDeadError, match=r"did not start within 0\.001 s \(instance_start_timeout_s\)"):
        await start_stack(config)
    assert not ray.is_initialized(), "a failed start shuts down the Ray it started"
    raylets = [p for p in psutil.Process().children(recursive=True) if _name(p) == "raylet"]
    _, alive = psutil.wait_procs(raylets, timeout=30)
    assert not alive, "no Ray process outlives the failed start"


def _name(process: psutil.Process) -> str:
    try:
        return str(process.name())
    except psutil.NoSuchProcess:
        return ""
