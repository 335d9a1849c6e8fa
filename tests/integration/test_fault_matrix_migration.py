"""Fault matrix (issue #16): instances killed in the middle of a live migration, and a full destination.

Three simulated workers behind real Worker gRPC servers and a real ``RouterCore``; a request
runs on ``w0`` and is migrated to ``w1``. At one step of the migration (pre-copy pull on the
destination, the suspend on the source, the admission on the destination) a hook kills a
worker the way a crashed process looks from the router: its gRPC server goes away with every
call on it, and its engine stops. Each test asserts the one property the matrix is about:
the client's stream either completes with every token exactly once, or fails with a clear
``SwitchyardError``, and never hangs (every await here is under a deadline).

The simulator's tokens depend only on the request id and the position within one engine
request: a request that *moved* (``admit_migrated`` continues the positions) produces
``expected_tokens(rid, n)`` exactly; one that *failed over* is resubmitted as ``prompt +
outputs`` with the remaining budget (``EngineRequest.continued``), whose positions restart, so
its tokens are the first leg's prefix followed by a fresh run of the remaining length.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from switchyard.config import MigrationConfig, RouterConfig
from switchyard.errors import CapacityError, EngineDeadError
from switchyard.messages import (
    EngineOutput,
    InstanceInfo,
    KvSnapshot,
    Membership,
    RoutingRequest,
    SamplingOptions,
    SuspendedRequest,
)
from switchyard.router.core import RouterCore
from switchyard.router.migration import MigrationOutcome
from switchyard.workers.sim.engine import SimEngine
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.waiting import eventually
from tests.unit.test_sim_migration import BS, KV, expected_tokens, make_instance

DEADLINE_S = 30.0
"""Every client stream must be over (completed or failed) within this: a hang fails the test."""

PROMPT = tuple(range(600))
MAX_TOKENS = 80

Hook = Callable[[], None]


class FaultySim(SimEngine):
    """A SimEngine that runs a hook when a migration step reaches it (and then dies with it).

    ``kill_on`` names the step: the hook kills this worker (or another), then the step waits to
    be cut off by its server going away, as a crashed process would never answer.
    """

    def __init__(self, instance: Any) -> None:
        super().__init__(instance, kv_transfer=KV)
        self.kill_on: str | None = None
        self.hook: Hook | None = None
        self.after_real_step = False
        """Run the real step first and kill afterwards (the suspend took effect, then the crash)."""

    async def _fault(self, step: str) -> None:
        if self.kill_on != step or self.hook is None:
            return
        hook, self.hook = self.hook, None
        hook()
        await asyncio.sleep(3600)  # cancelled when the server stops: the call dies with the process

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        if not self.after_real_step:
            await self._fault("snapshot")
        return await super().snapshot(request_id, after_tokens=after_tokens, min_new_blocks=min_new_blocks)

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        await self._fault("shadow_pull")
        return await super().shadow_pull(snapshot)

    async def suspend(self, request_id: str) -> SuspendedRequest:
        if self.after_real_step:
            suspended = await super().suspend(request_id)
            await self._fault("suspend")
            return suspended
        await self._fault("suspend")
        return await super().suspend(request_id)

    def admit_migrated(self, req: SuspendedRequest) -> AsyncGenerator[EngineOutput, None]:
        async def admitted() -> AsyncGenerator[EngineOutput, None]:
            await self._fault("admit")
            async for out in super(FaultySim, self).admit_migrated(req):
                yield out

        return admitted()


@dataclass
class Worker:
    engine: FaultySim
    server: grpc.aio.Server
    info: InstanceInfo
    dead: bool = False


class Fleet:
    """Three simulated workers; ``kill`` is what a crashed worker process looks like to the router."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def add(self, iid: str, **instance: Any) -> None:
        engine = FaultySim(make_instance(iid, **instance))

        def info(port: int) -> InstanceInfo:
            address = f"127.0.0.1:{port}"
            return InstanceInfo(
                iid, address, "sim", engine="sim", block_size=BS, kv_bytes_per_block=KV.bytes_per_block
            )

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
        self.workers[iid] = Worker(engine, server, info(port))

    def arm(self, iid: str, step: str, *victims: str, after_real_step: bool = False) -> None:
        """When ``step`` reaches worker ``iid``, kill ``victims`` (the step then never answers)."""
        engine = self.workers[iid].engine
        engine.kill_on, engine.hook, engine.after_real_step = step, self.kill_later(*victims), after_real_step

    def kill_later(self, *iids: str) -> Hook:
        """A hook that kills ``iids`` from outside the call that triggers it."""

        def hook() -> None:
            for iid in iids:
                task = asyncio.create_task(self.kill(iid))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

        return hook

    async def kill(self, iid: str) -> None:
        worker = self.workers[iid]
        if worker.dead:
            return
        worker.dead = True
        await worker.server.stop(None)
        await worker.engine.close()

    def membership(self, version: int, *iids: str) -> Membership:
        return Membership(version, tuple(self.workers[i].info for i in iids))


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet()
    for iid in ("w0", "w1", "w2"):
        await fleet.add(iid)
    yield fleet
    for task in list(fleet.tasks):
        with contextlib.suppress(Exception):
            await task
    for iid in fleet.workers:
        await fleet.kill(iid)


async def start_core(fleet: Fleet) -> RouterCore:
    """A router whose requests all land on w0 (the only member until the request runs)."""
    core = RouterCore(
        RouterConfig(
            policy="round_robin",
            load_report_interval_s=0.02,
            migration=MigrationConfig(admission_margin_blocks=0, step_timeout_s=5.0),
        )
    )
    core.apply_membership(fleet.membership(1, "w0"))
    await core.start()
    await eventually(lambda: core.ready, within_s=10)
    return core


@dataclass
class Result:
    tokens: list[int]
    instances: list[str]
    per_output: list[tuple[str, int]]
    outcome: MigrationOutcome | None
    error: BaseException | None


async def migrate_mid_stream(core: RouterCore, fleet: Fleet, rid: str, *, after: int = 10) -> Result:
    """Stream ``rid`` from w0; after ``after`` tokens publish every worker and migrate it to w1."""
    tokens: list[int] = []
    instances: list[str] = []
    per_output: list[tuple[str, int]] = []
    outcome: MigrationOutcome | None = None
    error: BaseException | None = None
    migration: asyncio.Task[MigrationOutcome] | None = None
    request = RoutingRequest(rid, "sim", PROMPT, SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    try:
        async with asyncio.timeout(DEADLINE_S):
            async for out in core.generate(request):
                tokens.extend(out.token_ids)
                instances.append(out.instance_id)
                per_output.append((out.instance_id, len(out.token_ids)))
                if migration is None and len(tokens) >= after:
                    core.apply_membership(fleet.membership(2, "w0", "w1", "w2"))
                    migration = asyncio.create_task(core.migrate(rid, "w1"))
    except TimeoutError:
        raise AssertionError(f"{rid}: the client's stream hung ({len(tokens)} tokens)") from None
    except Exception as exc:  # the matrix accepts a clear failure; the test says which
        error = exc
    if migration is not None:
        async with asyncio.timeout(DEADLINE_S):
            outcome = await migration
    return Result(tokens, instances, per_output, outcome, error)


def assert_complete(result: Result, rid: str, *, failed_over: bool = False) -> None:
    """Every token once: the uninterrupted sequence, or (``failed_over``) the source's prefix
    followed by the recomputed leg's tokens (see the module docstring)."""
    assert result.error is None, f"{rid} failed: {result.error!r}"
    expected = expected_tokens(rid, MAX_TOKENS)
    if failed_over:
        k = sum(n for iid, n in result.per_output if iid == "w0")
        assert 0 < k < MAX_TOKENS
        expected = expected[:k] + expected_tokens(rid, MAX_TOKENS - k)
    assert result.tokens == expected, "a token was lost or repeated"


def outcome_of(result: Result) -> tuple[str, str]:
    """``(status, reason)`` of the migration the test started."""
    assert result.outcome is not None
    return result.outcome.status, result.outcome.reason


async def test_destination_killed_during_precopy_the_request_stays_on_the_source(fleet: Fleet) -> None:
    """The destination dies while it pulls a pre-copy stage: the move is abandoned and the
    request finishes on the source, every token once."""
    core = await start_core(fleet)
    fleet.arm("w1", "shadow_pull", "w1")
    result = await migrate_mid_stream(core, fleet, "dst-precopy")
    assert_complete(result, "dst-precopy")
    assert outcome_of(result) == ("stayed", "precopy_failed")
    assert set(result.instances) == {"w0"}
    await core.close()


async def test_destination_killed_during_admission_recomputes_on_the_source(fleet: Fleet) -> None:
    """The destination dies after the suspend, as it admits the request: the source takes it
    back by recompute (its blocks were released) and the client sees no seam."""
    core = await start_core(fleet)
    fleet.arm("w1", "admit", "w1")
    result = await migrate_mid_stream(core, fleet, "dst-admit")
    assert_complete(result, "dst-admit")
    assert result.outcome is not None and (result.outcome.status, result.outcome.instance_id) == (
        "recomputed",
        "w0",
    )
    await core.close()


async def test_source_killed_during_precopy_fails_over(fleet: Fleet) -> None:
    """The source dies while it takes a pre-copy snapshot: its stream breaks, the move is
    abandoned, and the router fails the request over by recompute; no token lost or repeated."""
    core = await start_core(fleet)
    fleet.arm("w0", "snapshot", "w0")
    result = await migrate_mid_stream(core, fleet, "src-precopy")
    assert_complete(result, "src-precopy", failed_over=True)
    assert result.outcome is not None and result.outcome.status == "stayed"
    assert result.instances[-1] != "w0", "the request should have left the dead source"
    await core.close()


async def test_source_killed_right_after_suspend_still_completes(fleet: Fleet) -> None:
    """The source suspends the request and then dies before answering: the suspend call fails,
    the migration reports it lost, and the router recomputes it elsewhere from what the client saw."""
    core = await start_core(fleet)
    fleet.arm("w0", "suspend", "w0", after_real_step=True)
    result = await migrate_mid_stream(core, fleet, "src-suspend")
    assert_complete(result, "src-suspend", failed_over=True)
    assert outcome_of(result) == ("lost", "suspend_failed")
    assert result.instances[-1] in ("w1", "w2")
    await core.close()


async def test_source_and_destination_killed_during_admission_fails_over_to_a_third(fleet: Fleet) -> None:
    """Both ends die after the suspend: recompute fails on both, the migration is lost, and the
    router's failover takes the request to the third instance."""
    core = await start_core(fleet)
    fleet.arm("w1", "admit", "w0", "w1")
    result = await migrate_mid_stream(core, fleet, "both")
    assert_complete(result, "both", failed_over=True)
    assert result.outcome is not None and result.outcome.status == "lost"
    assert result.instances[-1] == "w2"
    await core.close()


async def test_every_instance_killed_mid_migration_fails_the_request_clearly(fleet: Fleet) -> None:
    """With nowhere left to go, the client gets a clear EngineDeadError (a 503 / SSE error at the
    gateway) after the tokens it already had, not a hang and not a silent truncation."""
    core = await start_core(fleet)
    fleet.arm("w1", "admit", "w0", "w1", "w2")
    result = await migrate_mid_stream(core, fleet, "nowhere")
    assert result.error is not None, "the stream must fail, not end as if complete"
    assert isinstance(result.error, EngineDeadError | CapacityError), f"not a clear error: {result.error!r}"
    assert result.tokens == expected_tokens("nowhere", len(result.tokens)), "what arrived is a prefix"
    assert len(result.tokens) < MAX_TOKENS
    await core.close()


async def test_destination_out_of_kv_blocks_refuses_and_the_request_stays(fleet: Fleet) -> None:
    """A destination without room for the request's blocks (+ margin) is refused at the
    admission check: nothing is suspended, and the request finishes on the source."""
    await fleet.kill("w1")
    await fleet.add("w1", num_kv_blocks=20, max_model_len=320)  # 600-token prompt needs 38+ blocks
    core = await start_core(fleet)
    result = await migrate_mid_stream(core, fleet, "full")
    assert_complete(result, "full")
    assert outcome_of(result) == ("stayed", "destination_full")
    assert set(result.instances) == {"w0"}
    await core.close()
