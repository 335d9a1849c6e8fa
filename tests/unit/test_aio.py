"""``switchyard.aio.aclose``: closes what can be closed, ignores what cannot."""

from __future__ import annotations

from collections.abc import AsyncIterator

from switchyard import aio


async def test_closes_a_suspended_generator_and_runs_its_finally() -> None:
    cleanup: list[str] = []

    async def gen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            cleanup.append("closed")

    stream = gen()
    assert await anext(stream) == 1
    await aio.aclose(stream)
    assert cleanup == ["closed"]
    assert [x async for x in stream] == []  # closed: it yields nothing more
    await aio.aclose(stream)  # a second close, or one after the end, is a no-op
    assert cleanup == ["closed"]


async def test_calls_aclose_on_any_object_that_has_one() -> None:
    class Stream:
        closed = 0

        async def aclose(self) -> None:
            self.closed += 1

    stream = Stream()
    await aio.aclose(stream)
    assert stream.closed == 1


async def test_ignores_plain_iterators_and_none() -> None:
    class Plain:
        def __aiter__(self) -> Plain:
            return self

        async def __anext__(self) -> int:
            raise StopAsyncIteration

    await aio.aclose(Plain())
    await aio.aclose(iter([1, 2]))
    await aio.aclose(None)
