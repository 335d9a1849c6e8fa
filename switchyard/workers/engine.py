"""The one async interface every engine adapter implements.

The instance actor, the worker gRPC service and the tests talk to engines only through this
protocol, so the real vLLM engine and the simulator are interchangeable. Migration steps
(``snapshot``/``suspend``/``admit_migrated``) join the protocol with the migration work.

Contract of ``generate`` (vLLM's own): on cancellation or ``GeneratorExit`` the adapter aborts
the request and re-raises; Switchyard errors pass through unchanged; anything else is wrapped
as ``EngineRequestError ... from exc``; ``EngineDeadError`` once the engine cannot serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from switchyard.messages import EngineOutput, EngineRequest, LoadReport

__all__ = ["Engine"]


@runtime_checkable
class Engine(Protocol):
    """An engine instance: token IDs in, streamed token IDs out, load on demand."""

    @property
    def block_size(self) -> int:
        """Tokens per KV block (routers hash prefixes at this granularity)."""
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

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine can no longer serve; cheap, called every second."""
        ...

    async def close(self) -> None:
        """Abort everything and release the engine's processes and memory."""
        ...
