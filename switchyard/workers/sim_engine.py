"""The simulated engine (a performance model, never inference) in real time and in virtual time.

``SimInstance`` says what one vLLM V1 instance would do in each step and how long the step
takes; this module supplies the clock, in one of two ways:

* ``SimEngine`` implements the ``Engine`` protocol in **real time**: an asyncio task runs the
  step loop and sleeps each step's modeled duration, so the instance actor, the worker gRPC
  service, the router and the gateway can be run against it exactly as against ``VLLMEngine``.
  Steps are kept on a modeled timeline (a late wake-up is made up by the next sleep, up to
  ``max_lag_s``) so event-loop jitter does not accumulate into simulated slowness.
* ``SimFleet`` drives many ``SimInstance``s in **virtual time**: a discrete-event loop over a
  ``VirtualClock`` that jumps from one step end (or scheduled callback) to the next without
  sleeping. Benchmarks replay hours of trace against 8-32 instances in seconds, and runs are
  deterministic (events at equal times run in the order they were scheduled). It is not an
  ``Engine``: asyncio code cannot share one virtual clock across instances without a
  virtual-time event loop, so benchmarks call routing policies from its callbacks instead.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from types import TracebackType

from switchyard.config import EngineConfig
from switchyard.errors import (
    ConfigError,
    EngineDeadError,
    EngineRequestError,
    MigrationError,
    SwitchyardError,
)
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    KvSnapshot,
    LoadReport,
    SuspendedRequest,
)
from switchyard.workers.sim_instance import SimInstance, StepResult

__all__ = ["OutputCallback", "SimEngine", "SimFleet", "VirtualClock"]

logger = logging.getLogger(__name__)

#: ``(virtual time, instance id, output delta)``, called when a step's outputs are delivered.
OutputCallback = Callable[[float, str, EngineOutput], None]


class _OutputStream:
    """Single-slot output buffer of one request: deltas merge while the consumer is behind.

    This is vLLM's ``RequestOutputCollector`` idea: one Event instead of a queue, so a slow
    consumer costs one merged output, not an unbounded backlog.
    """

    __slots__ = ("_error", "_pending", "_ready", "closed", "last")

    def __init__(self) -> None:
        self._pending: EngineOutput | None = None
        self._error: SwitchyardError | None = None
        self._ready = asyncio.Event()
        self.closed = False
        self.last: EngineOutput | None = None  # latest output put, for the counts an abort repeats

    def put(self, out: EngineOutput) -> None:
        if self.closed:
            return
        self.last = out
        prev = self._pending
        if prev is not None:
            out = EngineOutput(
                request_id=out.request_id,
                token_ids=(*prev.token_ids, *out.token_ids),
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                num_cached_tokens=out.num_cached_tokens,
                instance_id=out.instance_id,
            )
        self._pending = out
        self.closed = out.finished
        self._ready.set()

    def fail(self, error: SwitchyardError) -> None:
        if not self.closed:
            self._error, self.closed = error, True
            self._ready.set()

    def get_nowait(self) -> EngineOutput | None:
        out = self._pending
        if out is not None:
            self._pending = None
            self._ready.clear()
            return out
        if self._error is not None:
            raise self._error
        return None

    async def get(self) -> EngineOutput:
        while (out := self.get_nowait()) is None:
            await self._ready.wait()
        return out


class SimEngine:
    """``Engine`` over one ``SimInstance``, stepping in real time (asyncio sleeps per modeled step)."""

    def __init__(self, instance: SimInstance, *, max_lag_s: float = 0.05) -> None:
        self._instance = instance
        self._max_lag_s = max_lag_s
        self._streams: dict[str, _OutputStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: EngineDeadError | None = None

    @classmethod
    def from_config(cls, cfg: EngineConfig, *, instance_id: str = "sim-0") -> SimEngine:
        """Build a real-time engine; ``sim.time_mode="virtual"`` belongs to ``SimFleet`` instead."""
        if cfg.sim.time_mode != "real":
            raise ConfigError("SimEngine runs in real time; drive virtual-time instances with SimFleet")
        return cls(SimInstance.from_config(cfg, instance_id=instance_id))

    @property
    def instance(self) -> SimInstance:
        return self._instance

    @property
    def block_size(self) -> int:
        return self._instance.block_size

    @property
    def kv_bytes_per_block(self) -> int:
        """Unknown (0) until the simulator's migration model sizes blocks from its profile."""
        return 0

    @property
    def max_model_len(self) -> int:
        return self._instance.max_model_len

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream ``req``'s deltas; cancelling or closing the iterator aborts the request."""
        if self._dead is not None:
            raise self._dead
        self._instance.add_request(req)  # our own errors (context length, duplicates) pass through
        stream = _OutputStream()
        self._streams[req.request_id] = stream
        self._ensure_step_loop()
        try:
            while True:
                out = stream.get_nowait() or await stream.get()
                yield out
                if out.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self._abort(req.request_id, stream=None)
            raise
        except SwitchyardError:
            raise
        except Exception as exc:  # a bug in the model: fail this request, keep the engine
            self._abort(req.request_id, stream=None)
            raise EngineRequestError(f"simulated request {req.request_id!r} failed: {exc}") from exc
        finally:
            if self._streams.get(req.request_id) is stream:
                del self._streams[req.request_id]

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with an empty ``FinishReason.ABORT`` delta."""
        return self._abort(request_id, stream=self._streams.get(request_id))

    def load(self) -> LoadReport:
        return self._instance.load(time.monotonic())

    # Migration is not modelled yet: every step refuses, so a coordinator leaves requests put.
    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        raise MigrationError("migration is not supported by the simulator")

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        raise MigrationError("migration is not supported by the simulator")

    async def suspend(self, request_id: str) -> SuspendedRequest:
        raise MigrationError("migration is not supported by the simulator")

    def admit_migrated(self, req: SuspendedRequest) -> AsyncGenerator[EngineOutput, None]:
        raise MigrationError("migration is not supported by the simulator")

    async def release_suspended(self, request_id: str) -> bool:
        raise MigrationError("migration is not supported by the simulator")

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` once the engine is closed."""
        if self._dead is not None:
            raise self._dead

    async def close(self) -> None:
        """Abort everything; open streams raise ``EngineDeadError`` (their requests must move)."""
        if self._dead is None:
            self._dead = EngineDeadError(f"simulated engine {self._instance.instance_id} is closed")
        for request_id, stream in list(self._streams.items()):
            self._instance.abort(request_id)
            stream.fail(self._dead)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> SimEngine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _abort(self, request_id: str, *, stream: _OutputStream | None) -> bool:
        if not self._instance.abort(request_id):
            return False
        if stream is not None:
            last = stream.last
            stream.put(
                EngineOutput(
                    request_id=request_id,
                    token_ids=(),
                    finished=True,
                    finish_reason=FinishReason.ABORT,
                    num_prompt_tokens=last.num_prompt_tokens if last else 0,
                    num_cached_tokens=last.num_cached_tokens if last else 0,
                    instance_id=self._instance.instance_id,
                )
            )
        return True

    def _ensure_step_loop(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._step_loop())
        self._wake.set()

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        instance = self._instance
        step_end = loop.time()
        try:
            while True:
                if not instance.has_work:
                    self._wake.clear()
                    await self._wake.wait()
                    step_end = loop.time()
                    continue
                result = instance.step()
                now = loop.time()
                step_end = max(step_end, now - self._max_lag_s) + result.duration_s
                await asyncio.sleep(max(0.0, step_end - now))
                for out in result.outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
        except Exception as exc:  # the model itself broke: nothing can be served any more
            logger.exception("simulated engine %s died", instance.instance_id)
            self._dead = EngineDeadError(f"simulated engine {instance.instance_id} died: {exc}")
            for stream in self._streams.values():
                stream.fail(self._dead)


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
    """

    def __init__(
        self,
        instances: Iterable[SimInstance],
        *,
        clock: VirtualClock | None = None,
        on_output: OutputCallback | None = None,
    ) -> None:
        self.clock = clock or VirtualClock()
        self.on_output = on_output
        self._instances = {inst.instance_id: inst for inst in instances}
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._busy: set[str] = set()
        self._aborted: dict[str, set[str]] = {}  # aborted while their step was in flight

    @classmethod
    def from_config(
        cls, cfg: EngineConfig, num_instances: int, *, on_output: OutputCallback | None = None
    ) -> SimFleet:
        """``num_instances`` identical instances ``sim-0`` … ``sim-{n-1}`` built from ``cfg``."""
        instances = (SimInstance.from_config(cfg, instance_id=f"sim-{i}") for i in range(num_instances))
        return cls(instances, on_output=on_output)

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
        if instance_id not in self._busy:
            self._busy.add(instance_id)
            self.call_at(self.clock.now, lambda: self._start_step(instance_id))

    def abort(self, instance_id: str, request_id: str) -> bool:
        """Abort now; outputs of the step in flight are not delivered for it."""
        if not self._instances[instance_id].abort(request_id):
            return False
        self._aborted.setdefault(instance_id, set()).add(request_id)
        return True

    def load(self, instance_id: str) -> LoadReport:
        return self._instances[instance_id].load(self.clock.now)

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
        if not instance.has_work:
            self._busy.discard(instance_id)
            return
        result = instance.step()
        self.call_at(self.clock.now + result.duration_s, lambda: self._end_step(instance_id, result))

    def _end_step(self, instance_id: str, result: StepResult) -> None:
        aborted = self._aborted.get(instance_id, ())
        if self.on_output is not None:
            now = self.clock.now
            for out in result.outputs:
                if out.request_id not in aborted:
                    self.on_output(now, instance_id, out)
        self._start_step(instance_id)
