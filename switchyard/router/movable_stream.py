"""``MovableStream``: one request's upstream that can change instances mid-stream.

Why a wrapper and not more logic in the router's streaming loop: the loop already handles
dispatch, failover and metrics per attempt; a live migration is different, because the
client's stream must continue with no token lost or repeated while the request changes
instance *within* one attempt. This wrapper hides the switch: the consumer iterates it like
any ``EngineOutput`` stream.

How a move looks from here (:meth:`move` runs the coordinator):

1. The source's stream keeps flowing during pre-copy.
2. The suspend aborts the request on the source, whose stream then ends with ``ABORT`` (or
   dies). While a move is in progress that end is not forwarded: the wrapper waits for the
   coordinator's outcome instead.
3. ``moved``/``recomputed``: the source's authoritative outputs may be ahead of what reached
   us (abort drops in-flight outputs), so the tokens we have not yielded yet are emitted first
   (``suspended.output_token_ids[seen:]``), then the destination's stream follows.
   ``finished``: those tokens and a final output. ``stayed``: nothing changed (an ``ABORT``
   seen meanwhile was a real one and is forwarded). ``lost``: ``EngineDeadError``, so the
   router fails over by recompute from what the client has seen.

Every output is restated with the prompt and cached-token counts of the first one, so usage
counts the client's prompt, not the destination's (which includes the moved outputs). After a
failover the router core starts the next leg's stream with the counts the client already saw
(``usage``): this wrapper is the one place outputs are restated, across moves and failovers
alike (the request side of the continuation rule is ``EngineRequest.continued``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING

from switchyard import aio
from switchyard.errors import EngineDeadError, MigrationError
from switchyard.messages import EngineOutput, FinishReason

if TYPE_CHECKING:
    from switchyard.router.migration import MigrationCoordinator, MigrationOutcome, MigrationPeer

__all__ = ["MovableStream"]


class MovableStream:
    """An async iterator of one request's outputs whose source instance can be swapped."""

    def __init__(
        self,
        request_id: str,
        instance_id: str,
        upstream: AsyncIterator[EngineOutput],
        *,
        usage: tuple[int, int] | None = None,
    ) -> None:
        """``usage`` is ``(prompt tokens, cached tokens)`` as the client first saw them, for a
        stream that continues an earlier leg (failover); None takes this stream's first output's."""
        self.request_id = request_id
        self.instance_id = instance_id
        """The instance the request runs on now (changes after a move)."""
        self._upstream = upstream
        self._seen = 0  # tokens yielded so far: the suspended outputs are counted the same way
        self._num_prompt, self._num_cached = usage if usage is not None else (-1, -1)
        self._engine_cached = -1  # the prefix hit this leg's engine reported (its first output)
        self._moving: asyncio.Future[MigrationOutcome] | None = None
        self._closed = False
        self._gen = self._iterate()

    def __aiter__(self) -> MovableStream:
        return self

    async def __anext__(self) -> EngineOutput:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        self._closed = True
        await self._gen.aclose()
        await aio.aclose(self._upstream)

    @property
    def moving(self) -> bool:
        return self._moving is not None

    @property
    def engine_cached_tokens(self) -> int:
        """The prefix-cache hit the engine reported for this leg's prompt (0 before any output).

        Not the client's ``num_cached_tokens`` after a failover (usage keeps the first leg's):
        this is what routing feedback needs, the hit on the instance the leg was sent to."""
        return max(self._engine_cached, 0)

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens seen so far: the request's KV size, for picking what to move."""
        return max(self._num_prompt, 0) + self._seen

    async def move(
        self,
        coordinator: MigrationCoordinator,
        src: MigrationPeer,
        dst: MigrationPeer,
        *,
        block_size: int | None = None,
        kv_bytes_per_block: int | None = None,
    ) -> MigrationOutcome:
        """Migrate the request from ``src`` (where it runs) to ``dst``; the stream follows it."""
        if self._moving is not None:
            raise MigrationError(f"request {self.request_id!r} is already moving")
        if self._closed:
            raise MigrationError(f"request {self.request_id!r} has ended")
        fut: asyncio.Future[MigrationOutcome] = asyncio.get_running_loop().create_future()
        self._moving = fut
        try:
            outcome = await coordinator.migrate(
                self.request_id, src, dst, block_size=block_size, kv_bytes_per_block=kv_bytes_per_block
            )
        except BaseException:
            self._moving = None
            if not fut.done():
                fut.cancel()
            raise
        fut.set_result(outcome)
        if outcome.status == "stayed":
            self._moving = None  # nothing was aborted: a later ABORT is a real one
        if self._closed and outcome.stream is not None:
            await aio.aclose(outcome.stream)  # the client went away meanwhile
        return outcome

    async def _iterate(self) -> AsyncGenerator[EngineOutput, None]:
        while True:
            ended: EngineOutput | EngineDeadError | None = None
            try:
                async for out in self._upstream:
                    if self._moving is not None and out.finished and out.finish_reason is FinishReason.ABORT:
                        if out.token_ids:
                            yield self._out(out.token_ids, finished=False, reason=None, first=out)
                        ended = out
                        break
                    yield self._out(out.token_ids, finished=out.finished, reason=out.finish_reason, first=out)
                    if out.finished:
                        return
                else:
                    ended = EngineDeadError(f"instance {self.instance_id} ended the stream early")
            except EngineDeadError as exc:
                ended = exc
            if self._moving is None:
                if isinstance(ended, EngineDeadError):
                    raise ended
                assert ended is not None
                yield self._out((), finished=True, reason=ended.finish_reason, first=ended)
                return
            outcome = await self._moving
            self._moving = None
            await aio.aclose(self._upstream)
            if outcome.status == "stayed":  # nothing was suspended: the end we saw is real
                if isinstance(ended, EngineOutput):
                    yield self._out((), finished=True, reason=ended.finish_reason, first=ended)
                    return
                raise ended or EngineDeadError(f"instance {self.instance_id} ended the stream early")
            suspended = outcome.suspended
            missed = tuple(suspended.output_token_ids[self._seen :]) if suspended is not None else ()
            if outcome.status == "finished" and suspended is not None:
                yield self._out(missed, finished=True, reason=suspended.finish_reason or FinishReason.LENGTH)
                return
            if outcome.stream is None:  # lost: the router fails over from what was yielded
                if missed:
                    yield self._out(missed, finished=False, reason=None)
                raise EngineDeadError(
                    f"request {self.request_id} was lost by its migration ({outcome.reason})"
                )
            self.instance_id = outcome.instance_id
            self._upstream = outcome.stream
            if missed:
                yield self._out(missed, finished=False, reason=None)

    def _out(
        self,
        tokens: Sequence[int],
        *,
        finished: bool,
        reason: FinishReason | None,
        first: EngineOutput | None = None,
    ) -> EngineOutput:
        """An output of ``tokens`` in the client's terms: its usage as first seen, this instance.

        ``first`` is an upstream output whose counts become the usage if none was seen yet;
        outputs made from a suspended request's tokens pass None (it has no usage of its own).
        """
        if first is not None and self._engine_cached < 0:
            self._engine_cached = first.num_cached_tokens
            if self._num_prompt < 0:
                self._num_prompt, self._num_cached = first.num_prompt_tokens, first.num_cached_tokens
        self._seen += len(tokens)
        return EngineOutput(
            self.request_id,
            tuple(tokens),
            finished,
            reason,
            max(self._num_prompt, 0),
            max(self._num_cached, 0),
            self.instance_id,
        )
