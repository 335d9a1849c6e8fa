"""A whole `switchyard serve` stack for a test module: started, ready, and stopped without leaks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import ray

from switchyard.config import ServeConfig
from switchyard.serve import RunningStack, start_stack
from tests.helpers.waiting import eventually


@contextlib.asynccontextmanager
async def running_stack(
    config: ServeConfig, *, ready_within_s: float = 60.0, start_within_s: float = 300.0
) -> AsyncIterator[RunningStack]:
    """Start ``config``, wait until the router has a live instance, and stop it afterwards;
    stopping must also shut the local Ray cluster down (nothing outlives the module).

    An instance that does not start within ``start_within_s`` fails the start, which stops
    what did start and shuts Ray down; the test then fails on its own, well inside pytest's
    600 s timeout, instead of hanging there and leaving Ray to the next module.
    """
    config = config.model_copy(update={"instance_start_timeout_s": start_within_s})
    running = await start_stack(config)
    try:
        await eventually(lambda: running.core.ready, within_s=ready_within_s)
        yield running
    finally:
        await running.stop()
    assert not ray.is_initialized()
