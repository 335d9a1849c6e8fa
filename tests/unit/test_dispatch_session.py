"""The worker side of the Dispatch stream, over an engine that steps when the test says so.

``SteppedEngine`` emits one token for every running request per ``step()``, all in the same
loop iteration, the way an engine step does; the session's writer is a list (or a gate the
test opens), so packing, merging and terminal chunks are checked message by message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.api import wire
from switchyard.api.v1 import worker_pb2
from switchyard.errors import EngineDeadError
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, LoadReport, SamplingOptions
from switchyard.workers.dispatch_session import DispatchSession
from switchyard.workers.running import RunningRequests


class SteppedEngine:
    """Each ``step()`` gives every running request its next token at once."""

    def __init__(self) -> None:
        self._tick: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.running: set[str] = set()
        self.end_early: set[str] = set()

    def step(self) -> None:
        tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
        tick.set_result(None)

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        rid, n = req.request_id, req.sampling.max_tokens
        self.running.add(rid)
        done = False
        try:
            for i in range(n):
                await asyncio.shield(self._tick)  # shared: one waiter's cancel must not cancel it
                if rid in self.end_early:
                    done = True
                    return
                last = i == n - 1
                if last:  # before the yield: the consumer closes the stream once it has the end
                    done = True
                    self.finished.append(rid)
                yield EngineOutput(rid, [i], last, FinishReason.LENGTH if last else None, 3, 0)
        finally:
            self.running.discard(rid)
            if not done:
                self.aborted.append(rid)

    async def abort(self, request_id: str) -> bool:
        return False

    def load(self) -> LoadReport:
        return LoadReport("w0", time.monotonic())


class Wire:
    """The session's write: records each message; ``hold()`` blocks writes until ``release()``."""

    def __init__(self) -> None:
        self.replies: list[worker_pb2.DispatchReply] = []
        self._gate: asyncio.Event | None = None

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()
        self._gate = None

    async def write(self, reply: worker_pb2.DispatchReply) -> None:
        if self._gate is not None:
            await self._gate.wait()
        self.replies.append(reply)

    def chunks(self, rid: str | None = None) -> list[worker_pb2.GenerateChunk]:
        return [c for r in self.replies for c in r.chunks if rid is None or c.request_id == rid]


@pytest.fixture
async def engine() -> SteppedEngine:
    return SteppedEngine()


@pytest.fixture
async def wire_() -> Wire:
    return Wire()


@pytest.fixture
async def session(engine: SteppedEngine, wire_: Wire) -> AsyncIterator[DispatchSession]:
    s = DispatchSession(engine, "w0", wire_.write)  # type: ignore[arg-type]
    yield s
    await s.close()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def start(session: DispatchSession, rid: str, n: int = 3) -> None:
    session.handle(wire.dispatch_start_to_pb(EngineRequest(rid, [1, 2, 3], SamplingOptions(max_tokens=n))))


def abort(session: DispatchSession, rid: str) -> None:
    session.handle(wire.dispatch_abort_to_pb(rid))


async def test_one_engine_step_travels_in_one_message(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    for i in range(10):
        start(session, f"r{i}", n=3)
    await settle()
    for _ in range(3):
        engine.step()
        await settle()
    assert [len(r.chunks) for r in wire_.replies] == [10, 10, 10]
    assert all(c.finished for c in wire_.replies[-1].chunks)
    assert session.running == 0


async def test_a_slow_wire_merges_each_requests_deltas(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    """While a write is stuck, the engine keeps stepping; each request then holds one chunk."""
    start(session, "a", n=50)
    start(session, "b", n=50)
    await settle()
    engine.step()
    await settle()
    wire_.hold()  # the next write blocks, as on a full HTTP/2 window
    engine.step()
    await settle()
    for _ in range(40):
        engine.step()
        await settle()
    assert [len(r.chunks) for r in wire_.replies] == [2]
    wire_.release()
    await settle()
    tokens = {rid: [t for c in wire_.chunks(rid) for t in c.token_ids] for rid in "ab"}
    assert tokens == {"a": list(range(42)), "b": list(range(42))}
    assert len(wire_.replies) <= 4, "the backlog went out merged, not one message per token"


async def test_abort_is_answered_by_one_terminal_chunk_replacing_what_waited(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    start(session, "x", n=100)
    await settle()
    wire_.hold()
    engine.step()
    await settle()
    engine.step()
    await settle()  # token 1 waits for the writer, behind token 0's message
    abort(session, "x")
    abort(session, "x")  # twice: the second is for an id that already ended
    abort(session, "never")
    wire_.release()
    await settle()
    chunks = wire_.chunks("x")
    assert [(list(c.token_ids), c.finished, c.finish_reason) for c in chunks] == [
        ([0], False, ""),
        ([], True, "abort"),
    ]
    assert engine.aborted == ["x"] and session.running == 0


async def test_an_aborted_id_restarts_only_after_the_old_request_is_released(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    start(session, "x", n=100)
    await settle()
    abort(session, "x")
    start(session, "x", n=1)
    await settle()
    assert engine.aborted == ["x"]
    engine.step()
    await settle()
    chunks = wire_.chunks("x")
    assert [(c.finished, c.finish_reason) for c in chunks] == [(True, "abort"), (True, "length")]
    assert engine.finished == ["x"]


async def test_duplicate_start_is_refused_and_the_running_request_goes_on(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    start(session, "dup", n=1)
    start(session, "dup", n=1)
    await settle()
    errors = [c for c in wire_.chunks("dup") if c.error_code]
    assert [(c.error_code, c.error_message) for c in errors] == [
        (
            grpc.StatusCode.ALREADY_EXISTS.value[0],
            "request id 'dup' is already running on this dispatch stream",
        )
    ]
    engine.step()
    await settle()
    assert wire_.chunks("dup")[-1].finished and engine.finished == ["dup"]


async def test_an_engine_stream_that_stops_short_is_an_unavailable_error(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    engine.end_early.add("short")
    start(session, "short", n=5)
    await settle()
    engine.step()
    await settle()
    (last,) = wire_.chunks("short")
    status = wire.chunk_status(last)
    assert status is not None and status[0] is grpc.StatusCode.UNAVAILABLE
    assert status[1] == str(EngineDeadError("instance w0 ended request short's stream before it finished"))


async def test_close_aborts_everything_still_running(engine: SteppedEngine, session: DispatchSession) -> None:
    for i in range(3):
        start(session, f"r{i}", n=100)
    await settle()
    engine.step()
    await settle()
    await session.close()
    assert sorted(engine.aborted) == ["r0", "r1", "r2"] and not engine.running


async def test_finish_lets_running_requests_end_and_flushes(
    engine: SteppedEngine, wire_: Wire, session: DispatchSession
) -> None:
    start(session, "a", n=2)
    await settle()
    finishing = asyncio.create_task(session.finish())
    for _ in range(2):
        engine.step()
        await settle()
    await asyncio.wait_for(finishing, 5)
    assert wire_.chunks("a")[-1].finished and engine.aborted == []


async def test_the_worker_wide_claim_is_given_back_however_a_request_ends(
    engine: SteppedEngine, wire_: Wire
) -> None:
    """Sessions share the worker's ``RunningRequests``: a second session's start of a running
    id gets ALREADY_EXISTS; a request that ends, is aborted (even before its task first ran),
    or whose session closes gives its id back, and a reused id is held until both ended."""
    running = RunningRequests("w0")
    one = DispatchSession(engine, "w0", wire_.write, running=running)  # type: ignore[arg-type]
    two = DispatchSession(engine, "w0", wire_.write, running=running)  # type: ignore[arg-type]
    start(one, "a", n=1)
    start(two, "a", n=1)
    await settle()
    errors = [c for c in wire_.chunks("a") if c.error_code]
    assert [(c.error_code, c.error_message) for c in errors] == [
        (grpc.StatusCode.ALREADY_EXISTS.value[0], "request id 'a' is already running on instance w0")
    ]
    engine.step()
    await settle()
    assert "a" not in running
    start(one, "b", n=5)
    abort(one, "b")  # cancelled before its task ever ran
    start(one, "b", n=5)  # reused at once: held twice until the first is released
    await settle()
    assert "b" in running
    start(two, "c", n=5)
    await settle()
    await two.close()
    await one.close()
    assert len(running) == 0


async def test_an_ending_id_passes_to_another_call_once_the_old_request_is_released(
    engine: SteppedEngine, wire_: Wire
) -> None:
    """A suspended or aborted request's id may be started again from another call of the same
    router (a migration recomputing on its source, a failover on a new stream), but the new
    request reaches the engine only once the old one was released: the engine never holds two
    under one id. Another router still gets ALREADY_EXISTS."""
    running = RunningRequests("w0")
    one = DispatchSession(engine, "w0", wire_.write, running=running, owner="r1")  # type: ignore[arg-type]
    two = DispatchSession(engine, "w0", wire_.write, running=running, owner="r1")  # type: ignore[arg-type]
    other = DispatchSession(engine, "w0", wire_.write, running=running, owner="r2")  # type: ignore[arg-type]
    start(one, "h", n=5)
    await settle()
    running.ending("h")  # what the worker's Suspend or Abort does
    start(other, "h", n=1)
    await settle()
    assert [c.error_code for c in wire_.chunks("h") if c.error_code] == [
        grpc.StatusCode.ALREADY_EXISTS.value[0]
    ]
    wire_.replies.clear()
    start(two, "h", n=1)
    await settle()
    assert not [c for c in wire_.chunks("h") if c.error_code], "the owner's ending id is not a conflict"
    assert engine.running == {"h"} and engine.aborted == [], "the new one waits for the old one"
    await one.close()
    await settle()
    assert engine.aborted == ["h"] and engine.running == {"h"}, "released, then the new one started"
    engine.step()
    await settle()
    assert engine.finished == ["h"] and wire_.chunks("h")[-1].finished
    await two.close()
    await other.close()
    assert len(running) == 0
