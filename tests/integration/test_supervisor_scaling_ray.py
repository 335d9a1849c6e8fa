"""Resizing a pool through its supervisor: scale-out starts instances, scale-in drains first.

Real Ray, simulated engines (a performance model, so an instance starts in about a second).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import ray

from switchyard.api.auth import InternalCredentials
from switchyard.config import EngineConfig
from switchyard.messages import EngineRequest, SamplingOptions
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.local_cluster import LocalPool, start_local_pool
from switchyard.workers.supervisor import PoolSpec, Supervisor
from tests.helpers.supervisor import membership_after_restart
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]

SPEC = PoolSpec(
    name="sc", instances=2, engine=EngineConfig(kind="sim"), served_model_name="m", drain_timeout_s=60
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[LocalPool]:
    started = await start_local_pool(SPEC, num_cpus=2)
    try:
        yield started
    finally:
        await started.stop()
    assert not ray.is_initialized()


async def _ids(pool: LocalPool) -> list[str]:
    membership = await pool.supervisor.membership.remote()
    return [i.instance_id for i in membership.instances]


async def test_start_and_apply_are_idempotent(pool: LocalPool) -> None:
    """A second start or the same spec again (another router replica attaching) changes nothing."""
    before = await pool.supervisor.membership.remote()
    again = await pool.supervisor.start.remote()
    same = await pool.supervisor.apply.remote(SPEC)
    assert again.instances == before.instances == same.instances
    assert await _ids(pool) == ["sc-0", "sc-1"]


async def test_scale_out_starts_the_missing_instances(pool: LocalPool) -> None:
    """Raising instances to 3 starts sc-2 and publishes it."""
    await pool.supervisor.apply.remote(SPEC.model_copy(update={"instances": 3}))
    assert await _ids(pool) == ["sc-0", "sc-1", "sc-2"]


async def test_scale_in_removes_from_membership_at_once_and_finishes_running_requests(
    pool: LocalPool,
) -> None:
    """Lowering instances to 1: sc-1 and sc-2 leave membership immediately (no new work), a stream
    running on sc-2 still completes every token, and the drained actors then stop."""
    membership = await pool.supervisor.membership.remote()
    victim = next(i for i in membership.instances if i.instance_id == "sc-2")
    client = WorkerClient(
        victim.address, instance_id=victim.instance_id, credentials=InternalCredentials(pool.internal_token)
    )
    request = EngineRequest(
        request_id="draining",
        prompt_token_ids=list(range(1, 64)),
        sampling=SamplingOptions(max_tokens=400, ignore_eos=True),
    )
    tokens: list[int] = []

    async def consume() -> None:
        async for out in client.generate(request):
            tokens.extend(out.token_ids)

    handle = await pool.instance_handle("sc-2")
    task = asyncio.create_task(consume())
    await eventually(lambda: len(tokens) > 0, within_s=10)
    await pool.supervisor.apply.remote(SPEC.model_copy(update={"instances": 1}))
    assert await _ids(pool) == ["sc-0"]
    await asyncio.wait_for(task, 60)
    assert len(tokens) == 400, "the drained instance must finish its running request"
    await client.close()
    assert await pool.instance_handle("sc-2") is None

    async def actor_gone() -> bool:
        try:
            await handle.ping.remote()
        except ray.exceptions.RayActorError:
            return True
        return False

    for _ in range(100):
        if await actor_gone():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the drained instance actor should have stopped")


async def test_a_supervisor_left_by_a_dead_owner_does_not_block_a_new_start(pool: LocalPool) -> None:
    """An owner that died mid-start (a test past its timeout) leaves its named supervisor in
    this process's Ray; the next start of that pool replaces it instead of failing on the name."""
    stale_spec = PoolSpec(name="stale", instances=1, engine=EngineConfig(kind="sim"), served_model_name="m")
    stale = Supervisor.options(name="supervisor-stale").remote(stale_spec)
    await stale.membership.remote()  # it exists and holds the name
    fresh = await start_local_pool(stale_spec)
    try:
        assert not fresh.started_ray, "Ray was already up: the new pool joins it"
        assert [i.instance_id for i in fresh.memberships["stale"].instances] == ["stale-0"]
        with pytest.raises(ray.exceptions.RayActorError):
            await stale.membership.remote()
    finally:
        await fresh.stop()
    assert ray.is_initialized(), "stopping a pool that joined Ray leaves Ray to its owner"


async def test_a_restarted_supervisor_resumes_the_spec_applied_after_its_start(pool: LocalPool) -> None:
    """Ray restarts an actor with its constructor's arguments (2 instances here); the supervisor
    resumes the spec applied since (3) and adopts all three running instances unchanged."""
    await pool.supervisor.apply.remote(SPEC.model_copy(update={"instances": 3}))
    before = await pool.supervisor.membership.remote()
    assert [i.instance_id for i in before.instances] == ["sc-0", "sc-1", "sc-2"]
    ray.kill(pool.supervisor, no_restart=False)
    after = await membership_after_restart(pool.supervisor, before)
    assert after.instances == before.instances, "adopted as they were: none drained, none replaced"


def _instance_actors(pool_name: str) -> list[str]:
    return [n for n in ray.util.list_named_actors() if n.startswith(f"instance/{pool_name}-")]


def _no_instance_actors(pool_name: str) -> bool:
    return not _instance_actors(pool_name)


async def test_stopping_a_pool_leaves_no_detached_instance_behind(pool: LocalPool) -> None:
    """Instances are detached (they outlive their supervisor), so stopping a pool must kill them
    itself: after a normal stop, and after a stop whose supervisor was already dead, no instance
    actor of the pool is left in the (still running) Ray."""
    for name, kill_supervisor_first in (("tidy", False), ("orphans", True)):
        spec = PoolSpec(name=name, instances=2, engine=EngineConfig(kind="sim"), served_model_name="m")
        started = await start_local_pool(spec)
        assert len(_instance_actors(name)) == 2
        if kill_supervisor_first:
            ray.kill(started.supervisor, no_restart=True)
            await asyncio.sleep(1.0)
            assert len(_instance_actors(name)) == 2, "detached instances outlive their supervisor"
        await started.stop()
        assert ray.is_initialized(), "the module's Ray keeps running"
        await eventually(functools.partial(_no_instance_actors, name), within_s=10)
