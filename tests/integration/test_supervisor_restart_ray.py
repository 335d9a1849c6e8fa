"""The supervisor dies and comes back while `serve` streams: no request is lost (issue #16 item 4).

A whole ``serve`` stack (gateway, router, one pool of two simulated instances) on a real local
Ray. The supervisor is killed while streams run through the gateway, once by Ray (``ray.kill``
with a restart allowed) and once by SIGKILL of its process, as a crash or OOM would. Its
instances are detached, so they keep streaming; Ray restarts the supervisor, which re-adopts
them (same instances, not new ones), and it again replaces an instance that dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable

import httpx
import openai
import psutil
import pytest
import pytest_asyncio
import ray

from switchyard.config import EngineConfig, GatewayConfig, RouterConfig, ServeConfig
from switchyard.messages import InstanceInfo
from switchyard.serve import RunningStack
from tests.helpers.stack import running_stack
from tests.helpers.supervisor import membership_after_restart
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]

STREAMS = 6
TOKENS = 400  # a few seconds per stream on the simulator: long enough to span the restart


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[RunningStack]:
    config = ServeConfig(
        instances=2,
        engine=EngineConfig(kind="sim"),
        router=RouterConfig(policy="round_robin"),
        gateway=GatewayConfig(port=0),
        restart_backoff_s=0.2,
        ray_num_cpus=2,
    )
    async with running_stack(config, ready_within_s=30) as running:
        yield running


def _client(stack: RunningStack) -> openai.AsyncOpenAI:
    url = f"http://127.0.0.1:{stack.gateway_port}/v1"
    return openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)


async def _stream(client: openai.AsyncOpenAI, model: str, started: asyncio.Event) -> tuple[int, str | None]:
    """Stream one completion; (completion tokens by usage, finish reason)."""
    stream = await client.completions.create(
        model=model,
        prompt="the supervisor may die now",
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    tokens, finish = 0, None
    async for chunk in stream:
        started.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, finish


def _infos(stack: RunningStack) -> set[InstanceInfo]:
    return set(stack.core.membership.instances)


async def _kill_supervisor_during_streams(stack: RunningStack, kill: Callable[[], None]) -> None:
    """Start STREAMS streams, ``kill`` the supervisor once all are under way, and check that every
    stream completes, the supervisor comes back with the same instances, and serving goes on."""
    before = _infos(stack)
    assert len(before) == 2
    last = await stack.pool.supervisor.membership.remote()
    client = _client(stack)
    started = [asyncio.Event() for _ in range(STREAMS)]
    tasks = [asyncio.create_task(_stream(client, stack.model_name, ev)) for ev in started]
    await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 30)
    assert not any(t.done() for t in tasks), "every stream must still run when the supervisor dies"
    kill()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert results == [(TOKENS, "length")] * STREAMS, "every in-flight stream must complete"

    # The restarted supervisor adopted the running instances instead of starting new ones.
    membership = await membership_after_restart(stack.pool.supervisor, last)
    assert set(membership.instances) == before, "same instances, incarnations and addresses"
    assert _infos(stack) == before

    for _ in range(4):  # new requests after the restart
        resp = await client.completions.create(
            model=stack.model_name, prompt="after", max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert resp.usage is not None and resp.usage.completion_tokens == 5
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{stack.gateway_port}/health")
    assert health.status_code == 200, health.text
    await client.close()


def _supervisor_pid() -> int:
    """The process of the pool's supervisor actor (Ray titles it after the actor class), among
    this process's descendants: the Ray this test started, not another one on the machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::_SupervisorImpl"):
                found.append(proc.pid)
        except psutil.Error:
            continue
    assert len(found) == 1, f"expected one supervisor process, found {found}"
    return int(found[0])


async def _replaced(stack: RunningStack, old: InstanceInfo, *, within_s: float) -> None:
    """Wait until the router's membership has a later incarnation of ``old``'s instance."""
    await eventually(
        lambda: any(
            i.instance_id == old.instance_id and i.incarnation > old.incarnation
            for i in stack.core.membership.instances
        ),
        within_s=within_s,
    )


async def test_streams_complete_while_ray_kills_and_restarts_the_supervisor(stack: RunningStack) -> None:
    """ray.kill(supervisor, no_restart=False) mid-stream: every stream completes, the restarted
    supervisor re-adopts both instances, and new requests are served."""
    await _kill_supervisor_during_streams(stack, lambda: ray.kill(stack.pool.supervisor, no_restart=False))


async def test_streams_complete_when_the_supervisor_process_is_killed(stack: RunningStack) -> None:
    """SIGKILL of the supervisor's process (a crash, the OOM killer): the same as above, and the
    supervisor really is a new process afterwards."""
    pid = _supervisor_pid()
    await _kill_supervisor_during_streams(stack, lambda: os.kill(pid, signal.SIGKILL))
    assert _supervisor_pid() != pid


async def test_the_restarted_supervisor_still_replaces_a_dead_instance(stack: RunningStack) -> None:
    """After its restart the supervisor watches the adopted instances again: one that dies is
    replaced (next incarnation), and the router follows."""
    before = {i.instance_id: i for i in stack.core.membership.instances}
    ray.kill(await stack.pool.instance_handle("pool-0"), no_restart=True)
    await _replaced(stack, before["pool-0"], within_s=30)
    assert next(i for i in stack.core.membership.instances if i.instance_id == "pool-1") == before["pool-1"]
    await eventually(lambda: stack.core.ready)
    client = _client(stack)
    resp = await client.completions.create(
        model=stack.model_name, prompt="x", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    await client.close()


async def test_an_instance_that_died_while_the_supervisor_was_down_is_replaced(stack: RunningStack) -> None:
    """The supervisor and one instance die together: the restarted supervisor adopts the survivor
    and starts the missing instance itself (nobody calls ``start`` again)."""
    before = {i.instance_id: i for i in stack.core.membership.instances}
    victim = await stack.pool.instance_handle("pool-1")
    ray.kill(stack.pool.supervisor, no_restart=False)
    ray.kill(victim, no_restart=True)
    await _replaced(stack, before["pool-1"], within_s=60)
    assert next(i for i in stack.core.membership.instances if i.instance_id == "pool-0") == before["pool-0"]
