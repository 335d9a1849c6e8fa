"""Draining an instance: stop routing to it, then move its in-flight requests elsewhere.

Why: scale-in and maintenance must not abort requests (DESIGN §3.5, Llumnix's "drain before
scale-down"). Waiting for every stream to finish can take minutes for long generations;
live migration empties the instance in about one migration per request.

How (:func:`drain_instance`):

1. The registry marks the instance draining at once: every ``FleetView`` leaves it out, so
   no policy can pick it for a new request or a failover, whatever the policy.
2. Each request this router streams from it is migrated, one at a time (the coordinator
   allows one migration per instance at once), to the live instance of the same model with
   the most Llumnix freeness (free KV blocks / (batch size + 1)). Moves made by this drain
   count into the destination's batch until the end of the drain, so consecutive moves
   spread even though load reports lag behind.
3. A move refused for a transient reason (``busy``, ``destination_full``, unreachable) is
   retried on the next round; any other refusal (the source cannot snapshot or suspend it,
   the destination admission failed and it was recomputed in place) leaves the request
   running there, and the drain waits for it to finish.
4. The drain returns when no request of this router is left on the instance, or at the
   deadline; requests still there then are ``failed`` (they keep running: nothing is
   aborted). The instance stays draining until ``undrain``, so scale-in can remove it.

Only requests streaming through *this* router are seen; with several router replicas each
one drains its own (the operator calls every replica).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from switchyard import metrics
from switchyard.errors import MigrationError
from switchyard.router.rebalancer import state_freeness

if TYPE_CHECKING:
    from switchyard.router.core import RouterCore

__all__ = ["DrainResult", "drain_instance"]

logger = logging.getLogger(__name__)

_RETRY = frozenset({"busy", "destination_full", "destination_unreachable", "same_instance"})


@dataclass(slots=True)
class DrainResult:
    """What a drain did with each request it found on the instance."""

    instance_id: str
    moved: list[str] = field(default_factory=list)
    """Migrated to another instance (their streams continue there)."""
    finished: list[str] = field(default_factory=list)
    """Ended on the instance itself (before or while being moved)."""
    failed: list[str] = field(default_factory=list)
    """Still on the instance at the deadline, or lost by their migration (they failed over)."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Request id -> why it was not moved (refusal reason, ``timeout``, ...)."""
    destinations: dict[str, str] = field(default_factory=dict)
    """Request id -> the instance it moved to."""
    duration_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "complete": self.complete,
            "moved": self.moved,
            "finished": self.finished,
            "failed": self.failed,
            "reasons": self.reasons,
            "destinations": self.destinations,
            "duration_s": round(self.duration_s, 6),
        }


async def drain_instance(
    core: RouterCore, instance_id: str, *, timeout_s: float, poll_s: float = 0.05
) -> DrainResult:
    """Drain ``instance_id`` (see the module docstring). Raises ``KeyError`` if it is unknown."""
    registry = core.registry
    state = registry.get(instance_id)
    if state is None or not registry.set_draining(instance_id, True):
        raise KeyError(instance_id)
    model = state.info.model
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    result = DrainResult(instance_id)
    seen: set[str] = set()
    wait_only: set[str] = set()  # refused for good: wait for them to finish
    added: Counter[str] = Counter()  # destination -> requests this drain moved there
    logger.info("drain of %s: started (%d streams)", instance_id, len(core.streams))
    while True:
        here = [rid for rid, s in core.streams.items() if s.instance_id == instance_id]
        settled = {*result.moved, *result.failed}
        result.finished.extend(sorted(seen - set(here) - settled - set(result.finished)))
        seen.update(here)
        if not here:
            break
        if time.monotonic() >= deadline:
            for rid in here:
                result.failed.append(rid)
                result.reasons.setdefault(rid, "timeout")
            break
        for rid in here:
            stream = core.streams.get(rid)
            if rid in wait_only or stream is None or stream.moving or stream.instance_id != instance_id:
                continue
            if time.monotonic() >= deadline:
                break
            dst = _destination(core, model, instance_id, added)
            if dst is None:
                result.reasons[rid] = "no_destination"
                break  # nowhere to go right now: retry next round
            try:  # shielded: a drain cancelled mid-move (client gone) must not cut a stream
                outcome = await asyncio.shield(core.migrate(rid, dst))
            except MigrationError:
                continue  # it ended (or its stream closed) meanwhile: counted next round
            if outcome.status in ("moved", "recomputed") and outcome.instance_id != instance_id:
                result.moved.append(rid)
                result.destinations[rid] = outcome.instance_id
                result.reasons.pop(rid, None)
                added[outcome.instance_id] += 1
            elif outcome.status == "finished":
                result.finished.append(rid)
            elif outcome.status == "lost":
                result.failed.append(rid)
                result.reasons[rid] = f"lost:{outcome.reason}"
            else:
                result.reasons[rid] = outcome.reason or outcome.status
                if outcome.reason not in _RETRY:
                    wait_only.add(rid)
        await asyncio.sleep(poll_s)
    result.duration_s = time.monotonic() - t0
    metrics.DRAINS.labels("complete" if result.complete else "incomplete").inc()
    for name, ids in (("moved", result.moved), ("finished", result.finished), ("failed", result.failed)):
        if ids:
            metrics.DRAIN_REQUESTS.labels(name).inc(len(ids))
    logger.info(
        "drain of %s: %d moved, %d finished, %d failed in %.3f s",
        instance_id, len(result.moved), len(result.finished), len(result.failed), result.duration_s,
    )  # fmt: skip
    return result


def _destination(core: RouterCore, model: str, source: str, added: Counter[str]) -> str | None:
    """The freest live, non-draining instance of ``model`` other than ``source``."""
    best: tuple[float, str] | None = None
    for s in core.registry.fleet(model):
        if s.instance_id == source or s.report is None:
            continue
        free = state_freeness(s, added[s.instance_id])
        if free <= 0:
            continue
        key = (free, s.instance_id)
        if best is None or key > best:
            best = key
    return best[1] if best is not None else None
