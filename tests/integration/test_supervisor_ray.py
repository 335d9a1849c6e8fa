"""The supervisor on a real local Ray cluster: instances die, come back, and routers follow.

Uses the simulator engine so an instance restarts in about a second; the same supervisor
code path hosts vLLM instances (exercised in tests/e2e).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import ray

from switchyard.config import EngineConfig, RouterConfig
from switchyard.messages import Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.workers.local_cluster import LocalPool, start_local_pool
from switchyard.workers.supervisor import PoolSpec
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool_and_core() -> AsyncIterator[tuple[LocalPool, RouterCore]]:
    spec = PoolSpec(
        name="sim",
        instances=2,
        engine=EngineConfig(kind="sim"),
        served_model_name=MODEL,
        restart_backoff_s=0.2,
    )
    # A local start must not join another cluster it finds (RAY_ADDRESS, or a `ray start` on this
    # machine): with one that nothing listens on, joining it would fail the start.
    saved, os.environ["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS"), "127.0.0.1:9"
    try:
        pool = await start_local_pool(spec, num_cpus=2)
    finally:
        if saved is None:
            del os.environ["RAY_ADDRESS"]
        else:
            os.environ["RAY_ADDRESS"] = saved
    core = RouterCore(
        RouterConfig(policy="round_robin", load_report_interval_s=0.05), internal_token=pool.internal_token
    )
    await core.start()
    pool.follow(core.apply_membership)
    try:
        await eventually(lambda: core.ready)
        yield pool, core
    finally:
        await core.close()
        await pool.stop()
    assert not ray.is_initialized()


def _request(rid: str, max_tokens: int = 8) -> RoutingRequest:
    return RoutingRequest(
        request_id=rid,
        model=MODEL,
        prompt_token_ids=list(range(1, 40)),
        sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


async def _collect(core: RouterCore, req: RoutingRequest) -> tuple[list[int], set[str]]:
    tokens: list[int] = []
    instances: set[str] = set()
    async for out in core.generate(req):
        tokens.extend(out.token_ids)
        instances.add(out.instance_id)
    return tokens, instances


async def test_pool_starts_and_router_sees_both_instances(
    pool_and_core: tuple[LocalPool, RouterCore],
) -> None:
    """Two instances start, publish membership, and serve requests through the router."""
    _, core = pool_and_core
    membership: Membership = core.membership
    assert sorted(i.instance_id for i in membership.instances) == ["sim-0", "sim-1"]
    assert all(i.model == MODEL and i.address for i in membership.instances)
    tokens, _ = await _collect(core, _request("warm", 8))
    assert len(tokens) == 8


async def test_killed_instance_is_restarted_and_router_follows(
    pool_and_core: tuple[LocalPool, RouterCore],
) -> None:
    """ray.kill on an instance actor: membership drops it, the supervisor restarts it with the next
    incarnation, the router sees the new address, and new requests succeed on it."""
    pool, core = pool_and_core
    before = {i.instance_id: i for i in core.membership.instances}
    handle = await pool.instance_handle("sim-0")
    ray.kill(handle, no_restart=True)
    await eventually(lambda: "sim-0" not in {i.instance_id for i in core.membership.instances}, within_s=15)
    await eventually(
        lambda: any(
            i.instance_id == "sim-0" and i.incarnation == before["sim-0"].incarnation + 1
            for i in core.membership.instances
        ),
        within_s=30,
    )
    assert await pool.supervisor.restart_count.remote() >= 1
    await eventually(lambda: core.ready)
    served = set()
    for n in range(6):
        tokens, instances = await _collect(core, _request(f"after-restart-{n}", 4))
        assert len(tokens) == 4
        served |= instances
    assert served == {"sim-0", "sim-1"}, f"round robin should use the restarted instance too, got {served}"


async def test_request_in_flight_on_killed_instance_completes_elsewhere(
    pool_and_core: tuple[LocalPool, RouterCore],
) -> None:
    """A stream running on an instance that dies continues on the other one: every token arrives once."""
    pool, core = pool_and_core
    reference, _ = await _collect(core, _request("reference", 200))
    gen = core.generate(_request("victim", 200))
    first = await anext(gen)
    tokens = list(first.token_ids)
    victim = first.instance_id
    ray.kill(await pool.instance_handle(victim), no_restart=True)
    instances = {victim}
    async for out in gen:
        tokens.extend(out.token_ids)
        instances.add(out.instance_id)
    assert len(tokens) == 200
    assert len(instances) == 2, "the request should have moved to the surviving instance"
    # The simulator's tokens depend only on request id and position, so the moved request's
    # tokens are comparable with an uninterrupted run only position by position in count.
    assert len(reference) == 200
