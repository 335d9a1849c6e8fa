"""The request ids running on one worker, who started each, and who may act on them.

Why: a request id names a request inside the engine (its abort, its suspend, its KV blocks),
so two requests under one id on one engine cannot be told apart; the second one's abort or
migration would hit the first. Each ``Worker.Dispatch`` stream refused duplicates among its own
requests, but not against another router's stream, a ``Generate`` call or an ``AdmitMigrated``
on the same worker. One :class:`RunningRequests` per worker servicer is that check, for all of
them: a start whose id is held by another call fails with ``ConflictError`` (``ALREADY_EXISTS``)
and the running request is left alone.

Ownership: every claim records the *owner*, the router id the starting call carried
(``api.auth.caller_id``; ``""`` for a caller that sends none). ``Abort``, ``Snapshot``,
``Suspend`` and ``ReleaseSuspended`` are separate calls that name a request by id, so without
this any holder of the internal token could stop or steal another router's request by its id
(the victim saw ``finish_reason: "abort"``). :meth:`check` refuses them with
``PermissionDeniedError`` (``PERMISSION_DENIED``) unless the caller is the owner. A suspended
request's owner is remembered after its stream ended (its blocks wait for a pull or a release),
for the most recent :data:`MAX_SUSPENDED` suspends; an id the worker knows nothing about is left
to the engine, which answers "not found" for it.

A claim belongs to a *holder* (the call or Dispatch session that started the request) and is
counted: a Dispatch session that aborts a request and starts the same id again at once (a
router failing a request over back to the same instance) holds it twice until the old one has
been released by the engine; the session itself makes the new one wait for that, so the engine
never sees the two at once. The claim is released only after the engine released the request.

Handing an id over between the owner's own calls: once the owner suspended or aborted its
request (:meth:`ending`), the same owner may start the id again from another call, which waits
(:meth:`settled`) until the old call has released the old request. A migration that cannot
place a suspended request elsewhere recomputes it on its source under the same id while the
source's Dispatch stream is still closing the suspended one, and a router whose stream broke
may fail a request over to the same instance on a new stream. Nobody else gets an id that is
ending, and a running one is refused even to its owner.

Cost: one dict lookup and insert per started request, one per finished one, one per check.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from switchyard.errors import ConflictError, PermissionDeniedError

__all__ = ["MAX_SUSPENDED", "RunningRequests"]

MAX_SUSPENDED = 4096
"""Suspended requests whose owner a worker remembers; older ones fall back to the engine's own
"not held" answer. Far above the suspends in flight at once (one per migration, and a router
runs a few per instance), and the blocks' lease (30 s by default) frees them anyway."""


class _Claim:
    __slots__ = ("changed", "ending", "holders", "owner")

    def __init__(self, holder: object, owner: str) -> None:
        self.owner = owner
        self.holders: dict[object, int] = {holder: 1}
        self.ending = False  # its owner suspended or aborted it: the owner may start the id anew
        self.changed: asyncio.Event | None = None  # set on every release, for ``settled``


class RunningRequests:
    """Which holder runs each request id on this worker, and for which owner."""

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._claims: dict[str, _Claim] = {}
        self._suspended: OrderedDict[str, str] = OrderedDict()  # request id -> owner, oldest first

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._claims

    def __len__(self) -> int:
        return len(self._claims)

    def claim(self, request_id: str, holder: object, owner: str = "") -> None:
        """Record that ``holder`` starts ``request_id`` for ``owner``; ``ConflictError`` if it runs
        for another holder (unless it is ``owner``'s and ending: then call :meth:`settled`)."""
        claim = self._claims.get(request_id)
        if claim is None:
            self._claims[request_id] = _Claim(holder, owner)
            self._suspended.pop(request_id, None)  # a new request under the id: the old owner is moot
            return
        if holder in claim.holders:
            claim.holders[holder] += 1
        elif claim.ending and owner and owner == claim.owner:
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
        """The request under ``request_id`` was aborted or suspended by its owner."""
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

    def check(self, request_id: str, caller: str, action: str) -> None:
        """Raise ``PermissionDeniedError`` unless ``caller`` may ``action`` (``"abort"``, ...) the
        request: it owns it, or the worker knows no owner for it."""
        claim = self._claims.get(request_id)
        owner = claim.owner if claim is not None else self._suspended.get(request_id)
        if owner is not None and owner != caller:
            # The message names neither router id: ids tell token holders apart, so they stay private.
            raise PermissionDeniedError(
                f"cannot {action} request {request_id!r} on instance {self._instance_id}: "
                "another router started it (only the router that dispatched a request may "
                "abort, suspend or migrate it)",
                param="request_id",
            )

    def suspended(self, request_id: str, owner: str) -> None:
        """``owner`` suspended ``request_id``: its blocks wait, and only ``owner`` may release them."""
        self.ending(request_id)
        self._suspended[request_id] = owner
        self._suspended.move_to_end(request_id)
        while len(self._suspended) > MAX_SUSPENDED:
            self._suspended.popitem(last=False)

    def released(self, request_id: str) -> None:
        """The suspended request's blocks were released: forget its owner."""
        self._suspended.pop(request_id, None)
