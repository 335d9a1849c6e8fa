"""The request ids running on one worker, across every call that can start a request.

Why: a request id names a request inside the engine (its abort, its suspend, its KV blocks),
so two requests under one id on one engine cannot be told apart; the second one's abort or
migration would hit the first. Each ``Worker.Dispatch`` stream refused duplicates among its own
requests, but not against another router's stream, a ``Generate`` call or an ``AdmitMigrated``
on the same worker. One :class:`RunningRequests` per worker servicer is that check, for all of
them: a start whose id is held by another call fails with ``ConflictError`` (``ALREADY_EXISTS``)
and the running request is left alone.

A claim belongs to a *holder* (the call or Dispatch session that started the request) and is
counted: a Dispatch session that aborts a request and starts the same id again at once (a
router failing a request over back to the same instance) holds it twice until the old one has
been released by the engine; the session itself makes the new one wait for that, so the engine
never sees the two at once. The claim is released only after the engine released the request.

Handing an id over between calls: once a request was suspended or aborted (:meth:`ending`),
another call may start the id again, and waits (:meth:`settled`) until the old call has
released the old request. A migration that cannot place a suspended request elsewhere
recomputes it on its source under the same id while the source's Dispatch stream is still
closing the suspended one, and a router whose stream broke may fail a request over to the same
instance on a new stream. A running id is refused.

Cost: one dict lookup and insert per started request, one per finished one.
"""

from __future__ import annotations

import asyncio

from switchyard.errors import ConflictError

__all__ = ["RunningRequests"]


class _Claim:
    __slots__ = ("changed", "ending", "holders")

    def __init__(self, holder: object) -> None:
        self.holders: dict[object, int] = {holder: 1}
        self.ending = False  # suspended or aborted: another call may start the id anew
        self.changed: asyncio.Event | None = None  # set on every release, for ``settled``


class RunningRequests:
    """Which holder runs each request id on this worker."""

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._claims: dict[str, _Claim] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._claims

    def __len__(self) -> int:
        return len(self._claims)

    def claim(self, request_id: str, holder: object) -> None:
        """Record that ``holder`` starts ``request_id``; ``ConflictError`` if it runs for another
        holder (unless it is ending: then call :meth:`settled`)."""
        claim = self._claims.get(request_id)
        if claim is None:
            self._claims[request_id] = _Claim(holder)
            return
        if holder in claim.holders:
            claim.holders[holder] += 1
        elif claim.ending:
            claim.holders[holder] = 1
        else:
            raise ConflictError(
                f"request id {request_id!r} is already running on instance {self._instance_id}",
                param="request_id",
            )
        claim.ending = False

    async def settled(self, request_id: str, holder: object) -> None:
        """Return once no holder but ``holder`` holds ``request_id`` (their engine requests are
        released); at once in the usual case of a fresh id."""
        claim = self._claims.get(request_id)
        while claim is not None and len(claim.holders) > 1:
            if claim.changed is None:
                claim.changed = asyncio.Event()
            await claim.changed.wait()
            claim = self._claims.get(request_id)

    def ending(self, request_id: str) -> None:
        """The request under ``request_id`` was aborted or suspended."""
        claim = self._claims.get(request_id)
        if claim is not None:
            claim.ending = True

    def release(self, request_id: str, holder: object) -> None:
        """``holder``'s request ``request_id`` was released by the engine (a no-op if it holds none)."""
        claim = self._claims.get(request_id)
        if claim is None or holder not in claim.holders:
            return
        claim.holders[holder] -= 1
        if claim.holders[holder] <= 0:
            del claim.holders[holder]
            if claim.changed is not None:
                claim.changed.set()
                claim.changed = None
        if not claim.holders:
            del self._claims[request_id]
