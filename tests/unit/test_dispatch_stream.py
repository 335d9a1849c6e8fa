"""The router side of the Dispatch stream, over a scripted call: demultiplexing, merging, ends.

The fake call is what a ``grpc.aio.StreamStreamCall`` looks like to ``DispatchStream``: the test
pushes the worker's chunks (or a failure) and reads back what the stream wrote, so every
interleaving is chosen here rather than left to timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from switchyard.api import wire
from switchyard.api.v1 import worker_pb2
from switchyard.errors import (
    ConflictError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    SwitchyardError,
)
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions
from switchyard.router.dispatch_stream import DispatchStream


class FakeCall:
    """Chunks come from ``push`` (one message each, or several in one with ``push_many``); writes
    are recorded; ``cancel`` ends reading with CancelledError."""

    def __init__(self) -> None:
        self._incoming: asyncio.Queue[object] = asyncio.Queue()
        self.sent: list[worker_pb2.DispatchRequest] = []
        self.cancelled = False

    def push(self, item: worker_pb2.GenerateChunk | BaseException) -> None:
        if isinstance(item, worker_pb2.GenerateChunk):
            self.push_many([item])
        else:
            self._incoming.put_nowait(item)

    def push_many(self, chunks: Sequence[worker_pb2.GenerateChunk]) -> None:
        self._incoming.put_nowait(worker_pb2.DispatchReply(chunks=chunks))

    async def read(self) -> object:
        item = await self._incoming.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def write(self, request: worker_pb2.DispatchRequest) -> None:
        self.sent.append(request)

    def cancel(self) -> bool:
        if self.cancelled:
            return False
        self.cancelled = True
        self.push(asyncio.CancelledError())
        return True

    def sent_kinds(self) -> list[tuple[str, str]]:
        out = []
        for action in (wire.dispatch_from_pb(a) for m in self.sent for a in m.actions):
            if isinstance(action, EngineRequest):
                out.append(("start", action.request_id))
            else:
                out.append(("abort", str(action)))
        return out


def translate(code: grpc.StatusCode, details: str) -> SwitchyardError:
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details)
    return EngineRequestError(details)


@pytest.fixture
async def call() -> AsyncIterator[FakeCall]:
    yield FakeCall()


@pytest.fixture
async def stream(call: FakeCall) -> AsyncIterator[DispatchStream]:
    s = DispatchStream(call, instance_id="w0", address="127.0.0.1:1", request_error=translate)
    yield s
    await s.close()


def request(rid: str, n: int = 10) -> EngineRequest:
    return EngineRequest(rid, [1, 2, 3], SamplingOptions(max_tokens=n))


def chunk(
    rid: str, tokens: Sequence[int], *, finished: bool = False, reason: FinishReason | None = None
) -> worker_pb2.GenerateChunk:
    return wire.output_to_pb(EngineOutput(rid, list(tokens), finished, reason, 3, 0), instance_id="w0")


async def settle() -> None:
    """Let the reader and writer tasks run until they wait again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def drain(stream: DispatchStream, rid: str) -> list[EngineOutput]:
    inbox = stream._inboxes[rid]
    outs = []
    while True:
        out = await inbox.next()
        outs.append(out)
        if out.finished:
            return outs


async def test_interleaved_chunks_reach_their_own_requests(call: FakeCall, stream: DispatchStream) -> None:
    """Twenty requests on one call, chunks interleaved round-robin: each sees its tokens in order."""
    rids = [f"r{i}" for i in range(20)]
    inboxes = {rid: stream.start(request(rid)) for rid in rids}
    readers = {rid: asyncio.create_task(drain(stream, rid)) for rid in rids}
    await settle()
    assert call.sent_kinds() == [("start", rid) for rid in rids]
    for step in range(5):  # one message per step, every request's chunk in it (an engine step)
        last = step == 4
        reason = FinishReason.LENGTH if last else None
        call.push_many(
            [chunk(rid, [i * 100 + step], finished=last, reason=reason) for i, rid in enumerate(rids)]
        )
        await settle()  # consumers keep up: one output per chunk
    for i, rid in enumerate(rids):
        outs = await readers[rid]
        assert [t for o in outs for t in o.token_ids] == [i * 100 + s for s in range(5)]
        assert len(outs) == 5 and outs[-1].finish_reason is FinishReason.LENGTH
        inboxes[rid].close()
    assert stream.num_requests == 0
    assert [k for k, _ in call.sent_kinds()].count("abort") == 0, "finished requests need no abort"
    assert len(call.sent) == 1, "the starts queued together went out in one message"


async def test_slow_consumer_gets_merged_deltas_and_never_blocks_a_fast_one(
    call: FakeCall, stream: DispatchStream
) -> None:
    """A request nobody reads holds one merged chunk; the other request streams meanwhile."""
    slow = stream.start(request("slow", 200))
    stream.start(request("fast", 100))
    fast_reader = asyncio.create_task(drain(stream, "fast"))
    for i in range(100):
        call.push(chunk("slow", [i]))
        call.push(chunk("fast", [i], finished=i == 99, reason=FinishReason.LENGTH if i == 99 else None))
    fast_outs = await asyncio.wait_for(fast_reader, 5)
    assert [t for o in fast_outs for t in o.token_ids] == list(range(100))
    pending = slow._pending
    assert pending is not None and list(pending.token_ids) == list(range(100)), "one chunk, merged"
    call.push(chunk("slow", [100], finished=True, reason=FinishReason.STOP))
    await settle()
    out = await slow.next()
    assert list(out.token_ids) == list(range(101))
    assert out.finished and out.finish_reason is FinishReason.STOP and out.num_prompt_tokens == 3


async def test_close_aborts_and_the_id_is_reusable_at_once(call: FakeCall, stream: DispatchStream) -> None:
    """Closing an unfinished request sends an abort; chunks still in flight for it (up to the
    worker's terminal ack) are dropped, and a new request under the same id gets only its own."""
    first = stream.start(request("x"))
    call.push(chunk("x", [1]))
    await settle()
    assert list((await first.next()).token_ids) == [1]
    first.close()
    first.close()  # idempotent
    second = stream.start(request("x"))
    await settle()
    assert call.sent_kinds() == [("start", "x"), ("abort", "x"), ("start", "x")]
    call.push(chunk("x", [2]))  # the first request's, sent before the worker saw the abort
    call.push(chunk("x", [], finished=True, reason=FinishReason.ABORT))  # its ack
    call.push(chunk("x", [50]))  # the second request's
    call.push(chunk("x", [51], finished=True, reason=FinishReason.LENGTH))
    await settle()
    out = await second.next()  # its two chunks merged while nobody read
    assert list(out.token_ids) == [50, 51] and out.finished
    assert stream.num_requests == 0 and not stream._aborted


async def test_duplicate_request_id_is_refused_before_anything_is_sent(
    call: FakeCall, stream: DispatchStream
) -> None:
    first = stream.start(request("dup"))
    with pytest.raises(ConflictError, match="request id 'dup' is already streaming from instance w0"):
        stream.start(request("dup"))
    await settle()
    assert call.sent_kinds() == [("start", "dup")]
    call.push(chunk("dup", [7], finished=True, reason=FinishReason.STOP))
    await settle()
    assert list((await first.next()).token_ids) == [7], "the running request is untouched"


async def test_errors_arrive_after_the_tokens_before_them_translated_once(
    call: FakeCall, stream: DispatchStream
) -> None:
    """A request's status on its last chunk becomes our error, after any tokens it carried."""
    bad = stream.start(request("bad"))
    worse = stream.start(request("worse"))
    call.push(wire.error_chunk("bad", grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"))
    call.push(chunk("worse", [4]))
    failed = wire.error_chunk("worse", grpc.StatusCode.INTERNAL, "internal error")
    failed.token_ids.append(5)  # merged on the worker: a delta and the error in one chunk
    call.push(failed)
    await settle()
    with pytest.raises(InvalidRequestError, match=r"^empty prompt$"):
        await bad.next()
    out = await worse.next()  # both chunks merged while nobody read
    assert list(out.token_ids) == [4, 5] and not out.finished
    with pytest.raises(EngineRequestError, match=r"^internal error$"):
        await worse.next()
    assert stream.num_requests == 0


async def test_broken_stream_fails_every_request_after_what_arrived(
    call: FakeCall, stream: DispatchStream
) -> None:
    a, b = stream.start(request("a")), stream.start(request("b"))
    waiting = asyncio.create_task(b.next())
    call.push(chunk("a", [1]))
    await settle()
    no_metadata = grpc.aio.Metadata()
    call.push(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, no_metadata, no_metadata, "gone"))
    await settle()
    assert stream.ended
    assert list((await a.next()).token_ids) == [1]
    dead = r"^instance w0 at 127\.0\.0\.1:1 is unavailable \(Dispatch: gone\)$"
    with pytest.raises(EngineDeadError, match=dead):
        await a.next()
    with pytest.raises(EngineDeadError):
        await waiting
    with pytest.raises(EngineDeadError):
        stream.start(request("c"))
    a.close()
    b.close()
    assert call.sent_kinds() == [("start", "a"), ("start", "b")], "no abort on a stream that is gone"


async def test_close_ends_open_requests_as_removed(call: FakeCall, stream: DispatchStream) -> None:
    inbox = stream.start(request("r"))
    await stream.close()
    assert call.cancelled and stream.ended
    with pytest.raises(EngineDeadError, match="instance w0 was removed"):
        await inbox.next()


async def test_cancelling_a_wait_leaves_the_request_running(call: FakeCall, stream: DispatchStream) -> None:
    """Only close() aborts: a consumer whose wait was cancelled may wait again."""
    inbox = stream.start(request("r"))
    task = asyncio.create_task(inbox.next())
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    call.push(chunk("r", [9], finished=True, reason=FinishReason.STOP))
    await settle()
    assert list((await inbox.next()).token_ids) == [9]


async def test_chunks_for_unknown_requests_are_dropped(call: FakeCall, stream: DispatchStream) -> None:
    inbox = stream.start(request("known"))
    call.push(chunk("stranger", [1]))
    call.push(chunk("known", [2], finished=True, reason=FinishReason.STOP))
    await settle()
    assert list((await inbox.next()).token_ids) == [2]
    assert not stream.ended
