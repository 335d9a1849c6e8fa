"""``SimFleet``: many simulated instances on one virtual clock (benchmarks, no sleeping).

A discrete-event loop over a ``VirtualClock`` that jumps from one step end (or scheduled
callback) to the next, so benchmarks replay hours of trace against 8-32 instances in seconds,
and runs are deterministic (events at equal times run in the order they were scheduled). It
is not an ``Engine``: asyncio code cannot share one virtual clock across instances without a
virtual-time event loop, so benchmarks call routing policies from its callbacks instead.

Live migration between its instances (``migrate``) runs on the same timeline, staged and
priced by ``sim.migration``; the fleet only provides what a migration waits for (step
boundaries, a request's next output) and starts instances that were given work.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping

from switchyard.config import EngineConfig, MigrationConfig
from switchyard.messages import EngineOutput, EngineRequest, LoadReport
from switchyard.workers.sim.cost import KvTransferCost, load_profile
from switchyard.workers.sim.instance import SimInstance, StepResult
from switchyard.workers.sim.migration import SimMigrationOutcome, VirtualMigrator

__all__ = ["OutputCallback", "SimFleet", "VirtualClock"]

#: ``(virtual time, instance id, output delta)``, called when a step's outputs are delivered.
OutputCallback = Callable[[float, str, EngineOutput], None]


class VirtualClock:
    """Simulated seconds that only move when ``SimFleet`` advances them; callable like ``time.monotonic``."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, when: float) -> None:
        if when < self._now:
            raise ValueError(f"virtual time cannot go back from {self._now} to {when}")
        self._now = when


class SimFleet:
    """Discrete-event driver of many ``SimInstance``s on one ``VirtualClock`` (no sleeping).

    Each busy instance has one pending event, the end of its current step, at which its outputs
    are delivered to ``on_output`` and its next step is computed. Requests submitted while a
    step is in flight join the next step, as in vLLM. ``call_at`` schedules arbitrary work
    (trace arrivals, load-report ticks, rebalancer passes) on the same timeline.

    ``kv_transfer`` prices migrations (``migrate``); without it every migration stays put.
    """

    def __init__(
        self,
        instances: Iterable[SimInstance],
        *,
        clock: VirtualClock | None = None,
        on_output: OutputCallback | None = None,
        kv_transfer: KvTransferCost | None = None,
        migration: MigrationConfig | None = None,
    ) -> None:
        self.clock = clock or VirtualClock()
        self.on_output = on_output
        self._instances = {inst.instance_id: inst for inst in instances}
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._busy: set[str] = set()
        self._aborted: dict[str, set[str]] = {}  # aborted while their step was in flight
        self._boundary: dict[str, list[Callable[[], None]]] = {}  # run before an instance's next step
        self._watch: dict[str, Callable[[], None]] = {}  # request id -> run after its next output
        self._migrator = (
            VirtualMigrator(self, migration or MigrationConfig(), kv_transfer) if kv_transfer else None
        )

    @classmethod
    def from_config(
        cls,
        cfg: EngineConfig,
        num_instances: int,
        *,
        on_output: OutputCallback | None = None,
        migration: MigrationConfig | None = None,
    ) -> SimFleet:
        """``num_instances`` identical instances ``sim-0`` … ``sim-{n-1}`` built from ``cfg``;
        migrations priced by the profile's ``kv_transfer``."""
        instances = (SimInstance.from_config(cfg, instance_id=f"sim-{i}") for i in range(num_instances))
        cost = KvTransferCost.from_profile(load_profile(cfg.sim.profile), block_size=cfg.block_size)
        return cls(instances, on_output=on_output, kv_transfer=cost, migration=migration)

    @property
    def instances(self) -> Mapping[str, SimInstance]:
        return self._instances

    @property
    def now(self) -> float:
        return self.clock.now

    @property
    def pending_events(self) -> int:
        return len(self._events)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at virtual time ``when`` (not earlier than now)."""
        heapq.heappush(self._events, (max(when, self.clock.now), next(self._seq), callback))

    def submit(self, instance_id: str, req: EngineRequest) -> None:
        """Give ``req`` to an instance now; it joins that instance's next step."""
        self._instances[instance_id].add_request(req)
        self.kick(instance_id)

    def kick(self, instance_id: str) -> None:
        """Start stepping an instance that was idle (no-op when a step is pending or in flight)."""
        if instance_id not in self._busy:
            self._busy.add(instance_id)
            self.call_at(self.clock.now, lambda: self._start_step(instance_id))

    def abort(self, instance_id: str, request_id: str) -> bool:
        """Abort now; outputs of the step in flight are not delivered for it. A request caught
        between a migration's suspend and its admission is dropped there instead."""
        if not self._instances[instance_id].abort(request_id):
            return self._migrator is not None and self._migrator.cancel(request_id)
        self._aborted.setdefault(instance_id, set()).add(request_id)
        return True

    def load(self, instance_id: str) -> LoadReport:
        return self._instances[instance_id].load(self.clock.now)

    def migrate(
        self,
        request_id: str,
        source: str,
        destination: str,
        on_done: Callable[[SimMigrationOutcome], None] | None = None,
    ) -> None:
        """Live-migrate ``request_id`` (see ``sim.migration``); ``on_done`` gets the outcome."""
        if self._migrator is None:
            if on_done is not None:
                on_done(SimMigrationOutcome(request_id, "stayed", source, source, "not_supported", self.now))
            return
        self._migrator.start(request_id, source, destination, on_done)

    def is_migrating(self, request_id: str) -> bool:
        return self._migrator is not None and self._migrator.is_moving(request_id)

    def at_boundary(self, instance_id: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` before the instance's next step is scheduled (now, if it is idle)."""
        if instance_id in self._busy:
            self._boundary.setdefault(instance_id, []).append(callback)
        else:
            self.call_at(self.clock.now, callback)

    def on_first_output(self, request_id: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` right after the next output of ``request_id`` is delivered."""
        self._watch[request_id] = callback

    def run(self, until: float | None = None) -> None:
        """Process events in time order until none is left, or up to ``until`` (then the clock is there)."""
        events, clock = self._events, self.clock
        while events and (until is None or events[0][0] <= until):
            when, _seq, callback = heapq.heappop(events)
            clock.advance_to(when)
            callback()
        if until is not None and until > clock.now:
            clock.advance_to(until)

    def _start_step(self, instance_id: str) -> None:
        instance = self._instances[instance_id]
        self._aborted.pop(instance_id, None)
        for callback in self._boundary.pop(instance_id, ()):
            callback()
        if not instance.has_work:
            self._busy.discard(instance_id)
            for callback in self._boundary.pop(instance_id, ()):  # registered by the ones above
                self.call_at(self.clock.now, callback)
            return
        result = instance.step()
        self.call_at(self.clock.now + result.duration_s, lambda: self._end_step(instance_id, result))

    def _end_step(self, instance_id: str, result: StepResult) -> None:
        aborted = self._aborted.get(instance_id, ())
        on_output, watch, now = self.on_output, self._watch, self.clock.now
        for out in result.outputs:
            if out.request_id in aborted:
                continue
            if on_output is not None:
                on_output(now, instance_id, out)
            if watch and out.request_id in watch:
                watch.pop(out.request_id)()
        self._start_step(instance_id)
