"""The one async interface every engine adapter implements.

The instance actor, the worker gRPC service and the tests talk to engines only through this
protocol, so the real vLLM engine and the simulator are interchangeable. The migration
steps (``snapshot``/``shadow_pull``/``suspend``/``admit_migrated``/``release_suspended``) are
what ``router/migration.py``'s coordinator calls, locally or through the Worker service; an
engine that cannot migrate raises ``MigrationError`` from them, and the request stays put.

Contract of ``generate`` (vLLM's own): on cancellation or ``GeneratorExit`` the adapter aborts
the request and re-raises; Switchyard errors pass through unchanged; anything else is wrapped
as ``EngineRequestError ... from exc``; ``EngineDeadError`` once the engine cannot serve.
Whoever serves a stream ends it with :func:`release_stream`, which applies that contract.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from switchyard import aio
from switchyard.messages import EngineOutput, EngineRequest, KvSnapshot, LoadReport, SuspendedRequest

__all__ = ["Engine", "release_stream"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Engine(Protocol):
    """An engine instance: token IDs in, streamed token IDs out, load on demand."""

    @property
    def block_size(self) -> int:
        """Tokens per KV block (routers hash prefixes at this granularity)."""
        ...

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block holds (every layer's keys and values); 0 when the engine cannot say."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts."""
        ...

    def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream output deltas of ``req`` until it finishes or is aborted."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False when it is not (or no longer) running."""
        ...

    def load(self) -> LoadReport:
        """Current load; cheap enough to call every report interval."""
        ...

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        """Source: the running request's full KV blocks as a pull ticket; it keeps decoding.

        The ticket is empty (``kv_transfer_params == {}``: size only, nothing to pull) when
        fewer than ``min_new_blocks`` blocks are full beyond the first ``after_tokens`` tokens.
        """
        ...

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        """Destination: pull a snapshot's blocks into the prefix cache; return the tokens held."""
        ...

    async def suspend(self, request_id: str) -> SuspendedRequest:
        """Source: stop the request (its stream ends with ABORT), hold its blocks for a pull."""
        ...

    def admit_migrated(self, req: SuspendedRequest) -> AsyncIterator[EngineOutput]:
        """Destination: continue a suspended request from ``prompt + outputs``; stream new deltas."""
        ...

    async def release_suspended(self, request_id: str) -> bool:
        """Source: free blocks held for a pull that will not come; False when none were held."""
        ...

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine can no longer serve; cheap, called every second."""
        ...

    async def close(self) -> None:
        """Abort everything and release the engine's processes and memory."""
        ...


async def release_stream(
    engine: Engine, stream: AsyncIterator[EngineOutput], request_id: str, *, aborted: bool
) -> None:
    """Close an engine stream now and, if it did not finish, abort its request; never raises.

    Closing now rather than leaving it to the garbage collector is what makes an unfinished
    request's abort immediate: ``GeneratorExit`` inside the engine's ``generate`` aborts per
    the contract above, and ``abort()`` covers engines whose generator had already ended.
    """
    try:
        await aio.aclose(stream)
        if aborted:
            await engine.abort(request_id)
    except Exception:
        logger.exception("releasing request %s on the engine failed", request_id)
