"""Live migration in the virtual-time simulator, staged and priced like the real protocol.

Routing benchmarks that rebalance by migration are only worth their numbers if a move costs
in the simulator what it costs on a fleet: a pause of the request, a burst of bytes, blocks on
the destination. So this module replays the steps ``MigrationCoordinator`` takes against real
engines (``router/migration.py``; research ``vllm-migration.md`` §6.2), with each step's
effect applied to the ``SimInstance``s and its duration taken from ``KvTransferCost``:

1. **Probe and admission**: the source's KV extent, then the destination's free blocks must
   cover the request plus ``admission_margin_blocks`` (else the request stays).
2. **Pre-copy stages** (at most ``max_stages``) while the source keeps decoding: each stage
   snapshots the source's full blocks at a step boundary and pulls those the destination's
   prefix cache lacks; they land there as cached blocks (a vLLM shadow request's effect). A
   stage after the first runs only if at least ``last_stage_max_blocks`` new blocks accrued.
3. **Suspend** at the source's next step boundary (its outputs so far were delivered), then
   **admit** on the destination after pulling the tail (blocks it still lacks). The request
   joins the destination's waiting queue with its KV present, so nothing is recomputed, and
   continues the same token sequence. If the destination is short of blocks by then, it is
   admitted without KV instead (``recomputed``), as the coordinator's fallback does.

**Downtime** is the coordinator's: from the suspend call to the first token on the
destination, so it includes the step boundaries and the destination's queue. Each control
call costs ``control_rpc_s`` (half each way) and acts at the engine's next step boundary, as
the migration connector answers from the scheduler loop; a snapshot that hands out a ticket
and a suspend that holds blocks answer one step later still, because the connector publishes
a reply only once the step after its send registration is scheduled (``kv_connector.py``).
Not modelled: the source holding its blocks during the tail pull (they are freed at the
suspend), the 1-token compute of a shadow request, link contention between concurrent
transfers, and an idle source that never reaches the next step (it answers at once here).

Each migration is a generator that yields what it waits for (seconds, an instance's next step
boundary, or the request's first output); :class:`VirtualMigrator` resumes it from the
fleet's event loop, so a migration reads top to bottom like the coordinator's ``_run``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from switchyard.config import MigrationConfig
from switchyard.workers.sim.cost import KvTransferCost
from switchyard.workers.sim.instance import SimInstance

__all__ = ["FirstOutput", "MigrationHost", "SimMigrationOutcome", "VirtualMigrator", "admission_blocks"]

SimMigrationStatus = Literal["moved", "recomputed", "finished", "stayed"]


def admission_blocks(num_tokens: int, block_size: int, margin_blocks: int) -> int:
    """Free blocks a destination needs for a request of ``num_tokens`` (the coordinator's rule:
    its blocks, one more for the token to come, plus the margin)."""
    return -(-(num_tokens + 1) // block_size) + margin_blocks


@dataclass(frozen=True, slots=True)
class SimMigrationOutcome:
    """What one simulated migration did, in the coordinator's terms (``MigrationOutcome``)."""

    request_id: str
    status: SimMigrationStatus
    source: str
    instance_id: str
    """Where the request runs (or ended) now."""
    reason: str = ""
    started_s: float = 0.0
    stages: int = 0
    precopied_blocks: int = 0
    """Blocks pulled by the pre-copy stages (blocks the destination already cached excluded)."""
    tail_blocks: int = 0
    """Blocks pulled while the request was suspended."""
    bytes_moved: int = 0
    downtime_s: float | None = None
    """Suspend call to the first token on the destination; None if it was never suspended."""
    total_s: float = 0.0

    @property
    def blocks_moved(self) -> int:
        return self.precopied_blocks + self.tail_blocks


@dataclass(frozen=True, slots=True)
class FirstOutput:
    """Wait marker: resume when the destination delivers the request's next output."""

    request_id: str


_Wait = float | str | FirstOutput  # seconds | an instance id whose next step boundary to wait for
_Process = Generator[_Wait, None, SimMigrationOutcome]


class MigrationHost(Protocol):
    """What a migration needs from the virtual-time fleet that runs it (``SimFleet``)."""

    @property
    def now(self) -> float: ...

    @property
    def instances(self) -> Mapping[str, SimInstance]: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> None: ...

    def at_boundary(self, instance_id: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` before the instance's next step (soon, if it is idle)."""
        ...

    def on_first_output(self, request_id: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` after the request's next output is delivered."""
        ...

    def kick(self, instance_id: str) -> None:
        """Start stepping an idle instance that was given work."""
        ...


class VirtualMigrator:
    """Runs simulated migrations on a ``MigrationHost``; limits concurrency per instance."""

    def __init__(self, host: MigrationHost, config: MigrationConfig, cost: KvTransferCost) -> None:
        self._host = host
        self._cfg = config
        self._cost = cost
        self._active: Counter[str] = Counter()
        self._cancelled: set[str] = set()
        self._moving: set[str] = set()

    def is_moving(self, request_id: str) -> bool:
        return request_id in self._moving

    def cancel(self, request_id: str) -> bool:
        """Abort a request caught between its suspend and its admission; False if it is not."""
        if request_id not in self._moving:
            return False
        self._cancelled.add(request_id)
        return True

    def start(
        self,
        request_id: str,
        source: str,
        destination: str,
        on_done: Callable[[SimMigrationOutcome], None] | None = None,
    ) -> None:
        """Begin moving ``request_id``; ``on_done`` gets the outcome (at once if it cannot start)."""
        t0 = self._host.now
        stay = SimMigrationOutcome(request_id, "stayed", source, source, started_s=t0)
        if source == destination:
            reason = "same_instance"
        elif request_id in self._moving:
            reason = "already_moving"
        elif max(self._active[source], self._active[destination]) >= self._cfg.max_concurrent_per_instance:
            reason = "busy"
        else:
            self._active.update((source, destination))
            self._moving.add(request_id)
            self._advance(self._run(request_id, source, destination, t0), on_done, (source, destination))
            return
        if on_done is not None:
            on_done(dataclasses.replace(stay, reason=reason))

    def _advance(
        self,
        proc: _Process,
        on_done: Callable[[SimMigrationOutcome], None] | None,
        pair: tuple[str, str],
    ) -> None:
        try:
            wait = next(proc)
        except StopIteration as stop:
            outcome: SimMigrationOutcome = stop.value
            self._active.subtract(pair)
            self._moving.discard(outcome.request_id)
            self._cancelled.discard(outcome.request_id)
            if on_done is not None:
                on_done(outcome)
            return
        host = self._host

        def resume() -> None:
            self._advance(proc, on_done, pair)

        if isinstance(wait, float):
            host.call_at(host.now + wait, resume)
        elif isinstance(wait, str):
            host.at_boundary(wait, resume)
        else:
            host.on_first_output(wait.request_id, resume)

    def _run(self, rid: str, src_id: str, dst_id: str, t0: float) -> _Process:
        host, cfg, cost = self._host, self._cfg, self._cost
        src, dst = host.instances[src_id], host.instances[dst_id]
        bs, half = src.block_size, cost.control_rpc_s / 2
        out = SimMigrationOutcome(rid, "stayed", src_id, src_id, started_s=t0)
        gone: SimMigrationStatus = (
            "finished"  # what a request that ended (or was aborted) before its suspend did
        )

        # Size probe at the source, then the admission check against the destination's load.
        yield half
        yield src_id
        view = src.migration_view(rid)
        yield half
        if view is None:
            return dataclasses.replace(out, status=gone, reason="gone", total_s=host.now - t0)
        tokens = view[1]  # the live list: its leading full blocks never change
        yield cost.control_rpc_s
        if dst.num_free_blocks < admission_blocks(view[0] // bs * bs + bs, bs, cfg.admission_margin_blocks):
            return dataclasses.replace(out, reason="destination_full", total_s=host.now - t0)
        on_dst = 0  # leading full blocks the destination holds
        for stage in range(cfg.max_stages):
            min_new = 1 if stage == 0 else max(1, cfg.last_stage_max_blocks)
            yield half
            yield src_id
            view = src.migration_view(rid)
            full = -1 if view is None else view[0] // bs
            if full - on_dst >= min_new:
                yield src_id  # a ticket is published a step after its send is registered
            yield half
            if view is None:
                return dataclasses.replace(out, status=gone, reason="gone", total_s=host.now - t0)
            if full - on_dst < min_new:
                break  # few new blocks: the suspended stage pulls them with the tail
            yield cost.control_rpc_s + cost.transfer_s(full - dst.cached_prefix_blocks(tokens, full))
            landed = dst.precopy(tokens, full)
            if landed is None:
                return dataclasses.replace(out, reason="precopy_refused", total_s=host.now - t0)
            on_dst = full
            out = dataclasses.replace(
                out, stages=out.stages + 1, precopied_blocks=out.precopied_blocks + landed
            )
        t_suspend = host.now
        yield half
        yield src_id
        state = src.suspend(rid)
        if state is not None and state.num_computed:
            yield src_id  # so is a hold of the suspended request's blocks
        yield half
        if state is None:
            return dataclasses.replace(out, status=gone, reason="gone", total_s=host.now - t0)
        yield half  # the admission call reaches the destination, which pulls what it still lacks
        computed = state.num_computed
        yield cost.transfer_s(-(-computed // bs) - dst.cached_prefix_blocks(state.tokens, computed // bs))
        if rid in self._cancelled:
            return dataclasses.replace(out, status=gone, reason="aborted", total_s=host.now - t0)
        pulled = dst.admit_migrated(state)
        if pulled is None:  # short of blocks after all: recompute there, as the coordinator falls back
            dst.admit_migrated(dataclasses.replace(state, num_computed=0))
            out = dataclasses.replace(out, status="recomputed", reason="admission_failed")
        else:
            out = dataclasses.replace(out, status="moved", tail_blocks=pulled)
        host.kick(dst_id)
        yield FirstOutput(rid)
        return dataclasses.replace(
            out,
            instance_id=dst_id,
            bytes_moved=out.blocks_moved * cost.bytes_per_block,
            downtime_s=host.now - t_suspend,
            total_s=host.now - t0,
        )
