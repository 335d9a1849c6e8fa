"""``until_disconnect`` and ``StopSignal``: the gateway's watch on client disconnects and shutdown.

The HTTP tests (``tests/integration/test_gateway_http.py``) cover these through uvicorn; here
each outcome is pinned down directly, including the promise the handlers rely on: when the
work is cancelled, its cleanup (closing the core stream, which aborts the engine request) has
finished before ``until_disconnect`` returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from switchyard.router.gateway.streaming import StopSignal, until_disconnect


class Client:
    """An ASGI ``receive`` whose disconnect the test triggers."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}  # not a disconnect
        await self.gone.wait()
        return {"type": "http.disconnect"}


class Work:
    """Work that blocks until released, and records that its cleanup ran to the end."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cleaned_up = False

    async def __call__(self) -> None:
        self.started.set()
        try:
            await self.release.wait()
        finally:
            await asyncio.sleep(0.01)  # an await in cleanup, as closing a core stream has
            self.cleaned_up = True


def _no_tasks_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_work_that_finishes_is_done() -> None:
    client, work = Client(), Work()
    work.release.set()
    assert await until_disconnect(client.receive, work, StopSignal()) == "done"
    assert work.cleaned_up
    await asyncio.sleep(0)
    assert _no_tasks_left()


async def test_the_works_own_exception_is_raised_as_is() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await until_disconnect(Client().receive, fail, StopSignal())


async def test_disconnect_cancels_the_work_after_its_cleanup() -> None:
    client, work = Client(), Work()
    task = asyncio.create_task(until_disconnect(client.receive, work, StopSignal()))
    await work.started.wait()
    client.gone.set()
    assert await task == "disconnected"
    assert work.cleaned_up
    await asyncio.sleep(0)
    assert _no_tasks_left()


async def test_stopping_cancels_the_work_after_its_cleanup() -> None:
    client, work, stopping = Client(), Work(), StopSignal()
    task = asyncio.create_task(until_disconnect(client.receive, work, stopping))
    await work.started.wait()
    stopping.set()
    assert await task == "stopping"
    assert work.cleaned_up


async def test_already_stopping_ends_new_work_at_once() -> None:
    stopping = StopSignal()
    stopping.set()
    work = Work()
    assert await until_disconnect(Client().receive, work, stopping) == "stopping"


async def test_cancelling_the_caller_cancels_the_work_after_its_cleanup() -> None:
    client, work = Client(), Work()
    task = asyncio.create_task(until_disconnect(client.receive, work, StopSignal()))
    await work.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert work.cleaned_up
    await asyncio.sleep(0)
    assert _no_tasks_left()


async def test_a_disconnect_future_is_watched_without_a_task() -> None:
    """With the server's disconnect future (the gateway's connection protocol provides one),
    no watcher task reads ``receive()``: it used to cost ~50 µs per request."""
    client, work = Client(), Work()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(until_disconnect(client.receive, work, StopSignal(), gone))
    await work.started.wait()
    assert asyncio.all_tasks() == {asyncio.current_task(), task} and client.calls == 0
    gone.set_result(None)
    assert await task == "disconnected"
    assert work.cleaned_up


async def test_a_disconnect_future_is_released_when_the_work_is_done() -> None:
    work = Work()
    work.release.set()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await until_disconnect(Client().receive, work, StopSignal(), gone) == "done"
    assert gone.cancelled()  # the server drops it
    already: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    already.set_result(None)  # the client left before the work began
    assert await until_disconnect(Client().receive, Work(), StopSignal(), already) == "disconnected"


async def test_stop_signal_futures_resolve_on_set_and_do_not_pile_up() -> None:
    stopping = StopSignal()
    for _ in range(100):  # every finished request cancels its future: nothing is kept
        stopping.future().cancel()
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert not stopping._futures
    waiting = stopping.future()
    stopping.set()
    assert waiting.done() and stopping.is_set()
    assert stopping.future().done()  # set before asking: resolved at once
    await stopping.wait()  # still an asyncio.Event


async def test_a_disconnect_after_the_work_returned_changes_nothing() -> None:
    """The watcher may fire in the same loop turn the work ends in: the result is still "done",
    and the caller's task is not left with a pending cancellation."""
    client = Client()

    async def work() -> None:
        client.gone.set()  # the watcher's receive() completes on a later turn, after we return

    assert await until_disconnect(client.receive, work, StopSignal()) == "done"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # no stray CancelledError arrives at the next await


async def test_a_cancel_from_outside_during_a_disconnect_is_still_raised() -> None:
    """Both at once: the client left *and* the caller is cancelled. The caller's cancellation
    wins; swallowing it would make the handler's own shutdown hang."""
    client, work = Client(), Work()
    task = asyncio.create_task(until_disconnect(client.receive, work, StopSignal()))
    await work.started.wait()
    client.gone.set()
    await asyncio.sleep(0)  # the watcher's receive() returns and interrupts the work
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert work.cleaned_up


async def test_a_failing_receive_counts_as_a_disconnect_and_is_not_left_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken_receive() -> dict[str, Any]:
        raise OSError("transport closed")

    work = Work()
    with caplog.at_level("DEBUG", logger="switchyard.router.gateway.streaming"):
        assert await until_disconnect(broken_receive, work, StopSignal()) == "disconnected"
    assert work.cleaned_up
    assert "transport closed" in caplog.text  # logged at debug, not "exception never retrieved"
