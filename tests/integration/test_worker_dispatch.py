"""``WorkerClient`` over the multiplexed ``Worker.Dispatch`` stream, for real: a worker server on
port 0 in front of a ``ScriptedEngine``, no mocks of gRPC.

What must hold is what held with one call per request: every request sees exactly its own
tokens, closing or cancelling one aborts it on the engine (and nothing else), a worker that
goes away fails every request with ``EngineDeadError`` and leaves nothing running, and a
request's own failure surfaces as the same error a ``Generate`` call gave.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from switchyard.api import wire
from switchyard.api.v1 import worker_pb2, worker_pb2_grpc
from switchyard.errors import (
    CapacityError,
    ConflictError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    SwitchyardError,
)
from switchyard.messages import EngineOutput, EngineRequest, InstanceInfo, SamplingOptions
from switchyard.router.worker_client import WorkerClient
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.scripted_engine import ScriptedEngine
from tests.helpers.waiting import eventually


class FailingEngine(ScriptedEngine):
    """A scripted engine that fails the requests listed in ``failures`` after ``after`` tokens."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failures: dict[str, tuple[Exception, int]] = {}

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        failure = self.failures.get(req.request_id)
        n = 0
        async for out in super().generate(req):
            if failure is not None and n == failure[1]:
                raise failure[0]
            n += 1
            yield out
        if failure is not None:
            raise failure[0]


class Worker:
    def __init__(self, engine: FailingEngine, server: grpc.aio.Server, port: int) -> None:
        self.engine, self.server, self.port = engine, server, port
        self.address = f"127.0.0.1:{port}"

    @classmethod
    async def start(cls, port: int = 0, *, delay_s: float = 0.005) -> Worker:
        engine = FailingEngine("w0", delay_s=delay_s)

        def info(bound: int) -> InstanceInfo:
            return InstanceInfo("w0", f"127.0.0.1:{bound}", "m", engine="sim")

        server, bound = await start_worker_server(engine, info, host="127.0.0.1", port=port)
        return cls(engine, server, bound)


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = await Worker.start()
    yield w
    await w.server.stop(None)


@pytest.fixture
async def client(worker: Worker) -> AsyncIterator[WorkerClient]:
    async with WorkerClient(worker.address, instance_id="w0") as c:
        yield c


def request(rid: str, max_tokens: int = 10, *, prompt: list[int] | None = None) -> EngineRequest:
    tokens = prompt if prompt is not None else [5, 6, 7]
    return EngineRequest(rid, tokens, SamplingOptions(max_tokens=max_tokens))


async def tokens_of(stream: AsyncIterator[EngineOutput]) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


async def read_to_end(call: grpc.aio.StreamStreamCall) -> list[worker_pb2.GenerateChunk]:
    chunks = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        chunks.extend(reply.chunks)
    return chunks


async def read_until(
    call: grpc.aio.StreamStreamCall, done: Callable[[worker_pb2.GenerateChunk], bool]
) -> list[worker_pb2.GenerateChunk]:
    """Chunks up to the first one that ``done`` accepts (a message may hold more: kept)."""
    chunks: list[worker_pb2.GenerateChunk] = []
    while not any(done(c) for c in chunks):
        chunks.extend((await call.read()).chunks)
    return chunks


def send(*actions: worker_pb2.DispatchAction) -> worker_pb2.DispatchRequest:
    return worker_pb2.DispatchRequest(actions=actions)


async def test_many_concurrent_requests_share_one_stream(worker: Worker, client: WorkerClient) -> None:
    """Fifty requests at once, each with its own prompt: every one gets exactly its own tokens
    (chunks of all of them interleave on the one call)."""
    n = 50
    results = await asyncio.gather(
        *(tokens_of(client.generate(request(f"r{i}", 8, prompt=[1000 * i]))) for i in range(n))
    )
    for i, tokens in enumerate(results):
        assert tokens == [1000 * i + 1 + k for k in range(8)]
    assert client.dispatch_streams_opened == 1
    assert sorted(worker.engine.finished) == sorted(f"r{i}" for i in range(n))
    assert worker.engine.aborted == []


async def test_closing_or_cancelling_one_request_aborts_only_it(worker: Worker, client: WorkerClient) -> None:
    keep = client.generate(request("keep", 40))
    closed = client.generate(request("closed", 200))
    cancelled = client.generate(request("cancelled", 200))
    await anext(keep)
    await anext(closed)
    await anext(cancelled)
    await closed.aclose()
    reader = asyncio.create_task(tokens_of(cancelled))
    await asyncio.sleep(0.02)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await eventually(lambda: sorted(worker.engine.aborted) == ["cancelled", "closed"], within_s=5)
    rest = await tokens_of(keep)
    assert rest == [8 + k for k in range(1, 40)]
    assert worker.engine.finished == ["keep"] and worker.engine.running == 0


async def test_an_aborted_id_can_be_reused_at_once(worker: Worker, client: WorkerClient) -> None:
    """Failover back to the same instance reuses the request id right after aborting it."""
    first = client.generate(request("again", 200))
    await anext(first)
    await first.aclose()
    assert await tokens_of(client.generate(request("again", 5, prompt=[100]))) == [101, 102, 103, 104, 105]
    assert worker.engine.aborted == ["again"] and worker.engine.finished == ["again"]


async def test_worker_death_fails_every_request_and_aborts_them(worker: Worker, client: WorkerClient) -> None:
    streams = [client.generate(request(f"d{i}", 500)) for i in range(5)]
    for s in streams:
        await anext(s)
    await worker.server.stop(None)
    for s in streams:
        with pytest.raises(EngineDeadError, match=r"instance w0 at 127\.0\.0\.1:\d+ is unavailable"):
            async for _ in s:
                pass
    await eventually(lambda: worker.engine.running == 0, within_s=5)
    assert sorted(worker.engine.aborted) == [f"d{i}" for i in range(5)]


async def test_stream_reopens_after_the_worker_restarts(worker: Worker) -> None:
    async with WorkerClient(worker.address, instance_id="w0") as client:
        assert await tokens_of(client.generate(request("before", 3))) == [8, 9, 10]
        victim = client.generate(request("victim", 500))
        await anext(victim)
        await worker.server.stop(None)
        with pytest.raises(EngineDeadError):
            await tokens_of(victim)
        restarted = await Worker.start(worker.port)
        try:
            assert await tokens_of(client.generate(request("after", 3))) == [8, 9, 10]
            assert client.dispatch_streams_opened == 2
            assert restarted.engine.finished == ["after"]
        finally:
            await restarted.server.stop(None)


async def test_a_stream_that_goes_away_leaves_nothing_running(worker: Worker, client: WorkerClient) -> None:
    """The router's side of the call is cancelled (as a router that exits would): the worker
    aborts every request of that stream."""
    streams = [client.generate(request(f"o{i}", 500)) for i in range(3)]
    for s in streams:
        await anext(s)
    assert client._dispatch is not None
    await client._dispatch.close()
    await eventually(lambda: worker.engine.running == 0, within_s=5)
    assert sorted(worker.engine.aborted) == ["o0", "o1", "o2"]
    for s in streams:
        with pytest.raises(EngineDeadError, match="instance w0 was removed"):
            async for _ in s:  # tokens that arrived before the close come first
                pass


async def test_a_slow_consumer_does_not_hold_up_a_fast_one(worker: Worker, client: WorkerClient) -> None:
    """One request nobody reads while another streams to its end over the same call; the
    unread one then arrives in a few merged outputs, complete."""
    slow = client.generate(request("slow", 60))
    await anext(slow)
    fast = await asyncio.wait_for(tokens_of(client.generate(request("fast", 60, prompt=[500]))), 10)
    assert fast == [501 + k for k in range(60)]
    await eventually(lambda: "slow" in worker.engine.finished, within_s=5)
    outs = [out async for out in slow]
    assert [t for o in outs for t in o.token_ids] == [9 + k for k in range(59)]
    assert len(outs) < 10, f"{len(outs)} outputs: the pending deltas were not merged"


async def test_duplicate_ids_are_refused_on_both_sides(worker: Worker, client: WorkerClient) -> None:
    running = client.generate(request("dup", 30))
    await anext(running)
    with pytest.raises(ConflictError, match="request id 'dup' is already streaming from instance w0"):
        await anext(client.generate(request("dup", 3)))
    assert len(await tokens_of(running)) == 29, "the running request is untouched"
    # A client that does send a duplicate start gets a precise per-request error.
    async with grpc.aio.insecure_channel(worker.address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Dispatch()
        await call.write(send(wire.dispatch_start_to_pb(request("twice", 30))))
        await call.write(send(wire.dispatch_start_to_pb(request("twice", 30))))
        chunks = await read_until(call, lambda c: c.error_code != 0)
        errors = [c for c in chunks if c.error_code]
        assert [c.error_code for c in errors] == [grpc.StatusCode.ALREADY_EXISTS.value[0]]
        assert errors[0].error_message == "request id 'twice' is already running on this dispatch stream"
        await call.done_writing()  # half-close: the running one still finishes
        rest = await read_to_end(call)
        assert rest[-1].finished and rest[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks + rest) == 30
        assert await call.code() is grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("error", "after", "expected"),
    [
        (ContextLengthError("prompt of 5000 tokens does not fit 4096"), 0, InvalidRequestError),
        (InvalidRequestError("bad value"), 0, InvalidRequestError),
        (CapacityError("the engine is full"), 0, EngineDeadError),
        (EngineDeadError("engine died"), 2, EngineDeadError),
        (EngineRequestError("step failed"), 2, EngineRequestError),
        (RuntimeError("a bug with /internal/paths"), 1, EngineRequestError),
    ],
)
async def test_request_errors_match_what_a_generate_call_gave(
    worker: Worker, client: WorkerClient, error: Exception, after: int, expected: type[SwitchyardError]
) -> None:
    """Per-request errors cross the stream with the type and message a Generate call ended with
    (the method name in an ``EngineDeadError``'s message aside), after the tokens before them."""
    worker.engine.failures = {"viaDispatch": (error, after), "viaGenerate": (error, after)}
    got: list[int] = []
    with pytest.raises(expected) as via_dispatch:
        async for out in client.generate(request("viaDispatch")):
            got.extend(out.token_ids)
    assert got == [8 + k for k in range(after)]
    with pytest.raises(expected) as via_generate, client._translate("Generate"):
        _ = [c async for c in client._stub.Generate(wire.engine_request_to_pb(request("viaGenerate")))]
    assert str(via_dispatch.value) == str(via_generate.value).replace("(Generate:", "(Dispatch:")
    assert "/internal/paths" not in str(via_dispatch.value)
    assert not client._dispatch or not client._dispatch.ended, "one request's error leaves the stream up"


async def test_empty_prompt_is_invalid_and_the_stream_stays_usable(client: WorkerClient) -> None:
    with pytest.raises(InvalidRequestError, match=r"^empty prompt$"):
        await tokens_of(client.generate(request("empty", prompt=[])))
    assert await tokens_of(client.generate(request("fine", 2))) == [8, 9]
    assert client.dispatch_streams_opened == 1


async def test_generate_on_a_closed_client_is_dead(worker: Worker) -> None:
    client = WorkerClient(worker.address, instance_id="w0")
    await client.close()
    with pytest.raises(EngineDeadError, match="instance w0 was removed"):
        await anext(client.generate(request("late")))


async def test_the_abort_ack_is_one_terminal_chunk(worker: Worker) -> None:
    """On the wire: an abort of a running request is answered by one finished/abort chunk, and an
    abort of an unknown or finished id by nothing."""
    async with grpc.aio.insecure_channel(worker.address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Dispatch()
        await call.write(send(wire.dispatch_start_to_pb(request("a", 500))))
        first = await read_until(call, lambda c: True)
        assert first[0].request_id == "a" and not first[-1].finished
        await call.write(send(wire.dispatch_abort_to_pb("a"), wire.dispatch_abort_to_pb("never-started")))
        chunks = await read_until(call, lambda c: c.finished)
        assert (chunks[-1].finish_reason, list(chunks[-1].token_ids)) == ("abort", [])
        assert sum(c.finished for c in chunks) == 1
        await call.done_writing()
        assert await read_to_end(call) == []
    await eventually(lambda: worker.engine.running == 0, within_s=5)
    assert worker.engine.aborted == ["a"]
