"""Hotspot rebalancing: move running requests off overloaded instances by live migration.

Why: DualMap routes for cache affinity first, so a popular prefix can pile requests onto its
two candidates while the rest of the fleet idles; routing can only fix *new* requests. The
rebalancer fixes the ones already running (DESIGN §3.4, DualMap's hotspot-aware rebalancing)
with Llumnix migration (``RouterCore.migrate``).

The decision (:func:`plan_rebalance`) is a pure function of a load snapshot, so it is tested
table-driven without any I/O. :class:`Rebalancer` holds the one piece of state between
periods (which requests were moved or tried recently) and takes one **step**: ``plan()``
snapshots the router's view and plans, ``attempting(move)`` starts a move's cool-down. Its
asyncio loop (``run``/``run_once``) takes a step every ``period_s`` and applies the moves one
at a time through ``RouterCore.migrate`` (the migration coordinator allows one migration per
instance at once anyway); the rebalancing benchmark takes the same steps on a simulated fleet
in virtual time and applies the moves there.

Definitions (per model; instances that are draining take no part at all: the drain owns
their requests, and they never receive any):

* **queue length** ``q`` = requests running + waiting on the instance (as reported, plus what
  this router dispatched since the report);
* **overloaded**: ``waiting >= max_waiting`` (the queue is what breaks the TTFT SLO first), or
  ``q >= imbalance_ratio * mean(q)`` and ``q - mean(q) >= min_load_gap`` (far above the mean;
  the gap keeps a nearly idle fleet, where ratios are noise, from moving anything);
* **freeness** (Llumnix) = free KV blocks / (batch size + 1): how much room a new request has;
  the batch counts waiting requests too (``q``), since they will claim blocks before a newcomer;
* **source**: the overloaded instance with the longest queue (ties: least freeness);
* **request**: its shortest running request first (Llumnix "SR": least KV to copy, shortest
  pause), skipping requests already moving or moved within ``request_cooldown_s``;
* **destination**: the freest instance that is not overloaded, has ``q + 1 <= mean(q)`` (it
  stays at or under the mean after taking the request), more freeness than the source, and
  room for the request's blocks.

Each planned move updates the snapshot (source ``q - 1``, destination ``q + 1`` and its free
blocks), and planning stops after ``max_moves_per_period`` moves or when no source has a
legal move. Waiting requests that never started are moved the same way (the migration's
snapshot of a waiting request is empty; the destination recomputes it); re-dispatching them
without migration is not implemented.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from switchyard import metrics
from switchyard.config import RebalancerConfig
from switchyard.errors import MigrationError

if TYPE_CHECKING:
    from switchyard.router.migration import MigrationOutcome
    from switchyard.router.registry import InstanceRegistry, InstanceState

__all__ = [
    "InstanceLoad",
    "Move",
    "Pressure",
    "Rebalancer",
    "RequestLoad",
    "RouterView",
    "StreamView",
    "fleet_loads",
    "freeness",
    "plan_rebalance",
    "pressure",
    "state_freeness",
]

logger = logging.getLogger(__name__)


def freeness(free_blocks: int, batch_size: int) -> float:
    """Llumnix freeness: free KV blocks per request of the batch (plus the one to come).
    Callers pass running + waiting as the batch: queued requests claim blocks first."""
    return max(free_blocks, 0) / (max(batch_size, 0) + 1)


def state_freeness(state: InstanceState, extra_requests: int = 0) -> float:
    """Freeness of a registry instance from its last report plus what was dispatched since."""
    r = state.report
    free = r.kv_blocks_total - r.kv_blocks_used if r is not None else 0
    return freeness(free, state.queue_length + extra_requests)


@dataclass(frozen=True, slots=True)
class RequestLoad:
    """One running request as the planner sees it."""

    request_id: str
    num_tokens: int
    """Prompt + output tokens so far: the KV a migration copies."""


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance's load snapshot."""

    instance_id: str
    model: str
    free_blocks: int
    num_running: int
    num_waiting: int = 0
    block_size: int = 32
    draining: bool = False
    requests: tuple[RequestLoad, ...] = ()
    """The requests this router streams from it (candidates to move)."""


@dataclass(frozen=True, slots=True)
class Move:
    """Migrate ``request_id`` from ``source`` to ``destination``."""

    request_id: str
    source: str
    destination: str
    reason: str
    """Why the source is overloaded: ``queue`` (waiting >= max_waiting) or ``imbalance``."""


@dataclass(slots=True)
class _Sim:
    load: InstanceLoad
    q: int
    free: int
    movable: list[RequestLoad] = field(default_factory=list)

    @property
    def freeness(self) -> float:
        return freeness(self.free, self.q)


def _overload(s: _Sim, mean: float, p: RebalancerConfig) -> str | None:
    if s.load.num_waiting >= p.max_waiting:
        return "queue"
    if s.q >= p.imbalance_ratio * mean and s.q - mean >= p.min_load_gap:
        return "imbalance"
    return None


def _by_model(fleet: Iterable[InstanceLoad], skip: Collection[str] = ()) -> dict[str, list[_Sim]]:
    """The non-draining instances per model, each with its movable requests, shortest first."""
    by_model: dict[str, list[_Sim]] = {}
    for inst in fleet:
        if inst.draining:
            continue
        q = inst.num_running + inst.num_waiting
        movable = sorted(
            (r for r in inst.requests if r.request_id not in skip), key=lambda r: (r.num_tokens, r.request_id)
        )
        by_model.setdefault(inst.model, []).append(_Sim(inst, q, inst.free_blocks, movable))
    return by_model


@dataclass(frozen=True, slots=True)
class Pressure:
    """Which instances the planner's definitions call overloaded, and which could take one more
    request (not overloaded, at or under the mean queue with it); for reports and debugging."""

    overloaded: tuple[str, ...]
    receivers: tuple[str, ...]


def pressure(fleet: Iterable[InstanceLoad], params: RebalancerConfig) -> Pressure:
    """The snapshot's :class:`Pressure`, by the same rules :func:`plan_rebalance` applies."""
    overloaded: list[str] = []
    receivers: list[str] = []
    for sims in _by_model(fleet).values():
        mean = sum(s.q for s in sims) / len(sims)
        for s in sims:
            if _overload(s, mean, params):
                overloaded.append(s.load.instance_id)
            elif s.q + 1 <= mean:
                receivers.append(s.load.instance_id)
    return Pressure(tuple(overloaded), tuple(receivers))


def plan_rebalance(
    fleet: Iterable[InstanceLoad], params: RebalancerConfig, *, skip: Collection[str] = ()
) -> list[Move]:
    """The moves that relieve overloaded instances (see the module docstring), at most
    ``params.max_moves_per_period``. ``skip``: request ids that must not move now."""
    by_model = _by_model(fleet, skip)
    moves: list[Move] = []
    for model in sorted(by_model):
        sims = by_model[model]
        if len(sims) < 2:
            continue
        mean = sum(s.q for s in sims) / len(sims)
        while len(moves) < params.max_moves_per_period:
            move = _next_move(sims, mean, params)
            if move is None:
                break
            moves.append(move)
    return moves


def _next_move(sims: Sequence[_Sim], mean: float, p: RebalancerConfig) -> Move | None:
    sources = sorted(
        (s for s in sims if s.movable and _overload(s, mean, p)),
        key=lambda s: (-s.q, s.freeness, s.load.instance_id),
    )
    for src in sources:
        reason = _overload(src, mean, p)
        assert reason is not None
        for req in src.movable:
            need = -(-(req.num_tokens + 1) // src.load.block_size)
            dests = [
                d
                for d in sims
                if d is not src
                and _overload(d, mean, p) is None
                and d.q + 1 <= mean
                and d.freeness > src.freeness
                and d.free >= need
            ]
            if not dests:
                continue
            dst = max(dests, key=lambda d: (d.freeness, -d.q, d.load.instance_id))
            src.movable.remove(req)
            src.q -= 1
            src.free += need
            dst.q += 1
            dst.free -= need
            return Move(req.request_id, src.load.instance_id, dst.load.instance_id, reason)
    return None


class StreamView(Protocol):
    """What the planner reads of one request's upstream (``MovableStream`` provides it)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def moving(self) -> bool: ...

    @property
    def num_tokens(self) -> int: ...


class RouterView(Protocol):
    """What a rebalancing step reads of a router (``RouterCore`` provides it)."""

    @property
    def registry(self) -> InstanceRegistry: ...

    @property
    def streams(self) -> Mapping[str, StreamView]: ...


@runtime_checkable
class Migrator(RouterView, Protocol):
    """A router that can also apply a move (``RouterCore``)."""

    async def migrate(self, request_id: str, dst_instance_id: str) -> MigrationOutcome: ...


def fleet_loads(registry: InstanceRegistry, streams: Mapping[str, StreamView]) -> list[InstanceLoad]:
    """The planner's snapshot of the router's view: live reporting instances and their streams."""
    per_instance: dict[str, list[RequestLoad]] = {}
    for rid, stream in streams.items():
        if not stream.moving:
            per_instance.setdefault(stream.instance_id, []).append(RequestLoad(rid, stream.num_tokens))
    out = []
    for s in registry:
        r = s.report
        if r is None or not s.live:
            continue
        out.append(
            InstanceLoad(
                instance_id=s.instance_id,
                model=s.info.model,
                free_blocks=r.kv_blocks_total - r.kv_blocks_used,
                num_running=r.num_running + s.pending_requests,
                num_waiting=r.num_waiting,
                block_size=s.info.block_size,
                draining=registry.is_draining(s.instance_id),
                requests=tuple(per_instance.get(s.instance_id, ())),
            )
        )
    return out


class Rebalancer:
    """Every ``period_s``: snapshot, plan, migrate (sequentially; failures only count)."""

    def __init__(
        self, router: RouterView, config: RebalancerConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._router = router
        self._config = config
        self._clock = clock
        self._tried: dict[str, float] = {}  # request id -> when it was last moved or tried
        self.last_loads: list[InstanceLoad] = []
        """The snapshot the latest plan was made from (reports and debugging)."""

    def plan(self) -> list[Move]:
        """One step's plan: forget cooled-down requests, snapshot the router's view, plan."""
        now = self._clock()
        cooldown = self._config.request_cooldown_s
        self._tried = {rid: t for rid, t in self._tried.items() if now - t < cooldown}
        self.last_loads = fleet_loads(self._router.registry, self._router.streams)
        return plan_rebalance(self.last_loads, self._config, skip=self._tried.keys())

    def attempting(self, move: Move) -> None:
        """``move`` is being applied now: its request is not picked again for the cool-down."""
        self._tried[move.request_id] = self._clock()

    async def run(self) -> None:
        """Run until cancelled; a failing period is logged and the next one runs."""
        while True:
            await asyncio.sleep(self._config.period_s)
            try:
                await self.run_once()
            except Exception:
                logger.exception("rebalancer: a period failed")

    async def run_once(self) -> list[tuple[Move, str]]:
        """Plan once and apply the moves through the router; returns each move with its outcome."""
        router = self._router
        assert isinstance(router, Migrator), "applying moves needs a router that migrates"
        done: list[tuple[Move, str]] = []
        for move in self.plan():
            self.attempting(move)
            outcome: str
            try:
                moving = router.migrate(move.request_id, move.destination)
                outcome = (await asyncio.shield(moving)).status  # a cancelled loop never cuts a move
            except MigrationError as exc:  # it ended, or an instance left, since the snapshot
                logger.info("rebalancer: %s not moved (%s)", move.request_id, exc)
                outcome = "error"
            metrics.REBALANCER_ACTIONS.labels("migrate", outcome).inc()
            logger.info(
                "rebalancer: %s %s -> %s (%s): %s",
                move.request_id, move.source, move.destination, move.reason, outcome,
            )  # fmt: skip
            done.append((move, outcome))
        return done
