"""``MigrationCoordinator``: move a running request, with its KV cache, from one instance to another.

Why multi-stage (Llumnix, research ``vllm-migration.md`` §6.2): stopping a request, copying all
of its KV and resuming it elsewhere makes the client wait for the whole copy. Instead, while the
source keeps decoding, the destination pre-pulls the request's *full* blocks (immutable in vLLM
V1) into its prefix cache through 1-token shadow requests, repeating while many new blocks
accrued (at most ``max_stages``). Only then is the source suspended; the destination admits
``prompt + outputs`` and its prefix cache already holds all but the last block or two, so the
downtime stage pulls only the tail.

Every failure path leaves the request served (``MigrationError`` never reaches a client):

* before the suspend (destination refuses, unreachable, pull fails, source snapshot fails):
  nothing happened to the request; it stays on the source (``stayed``);
* after the suspend (the admission or its first token fails): the source's held blocks are
  released and the request is resubmitted without KV (recompute), on the destination, else
  on the source (``recomputed``); if both are gone the outcome is ``lost`` and the caller
  falls back to its own failover (the router resubmits what the client has seen).

The coordinator only calls :class:`MigrationPeer` methods, which both an in-process engine
(:class:`EnginePeer`) and a remote worker (``router.worker_client.WorkerClient``) provide, so
the same steps run locally in tests and over gRPC from a router. It records the metrics; the
engines only return data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from switchyard import aio, metrics
from switchyard.config import MigrationConfig
from switchyard.errors import MigrationError
from switchyard.messages import (
    EngineOutput,
    KvSnapshot,
    LoadReport,
    SuspendedRequest,
)
from switchyard.workers.engine import Engine

__all__ = ["EnginePeer", "MigrationCoordinator", "MigrationOutcome", "MigrationPeer"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_NO_TICKET = 1 << 30  # min_new_blocks that no request reaches: a snapshot that only sizes
OutcomeStatus = Literal["moved", "recomputed", "finished", "stayed", "lost"]


class MigrationPeer(Protocol):
    """What the coordinator needs of an instance, local or remote."""

    @property
    def instance_id(self) -> str: ...

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot: ...

    async def shadow_pull(self, snapshot: KvSnapshot) -> int: ...

    async def suspend(self, request_id: str) -> SuspendedRequest: ...

    def admit_migrated(self, req: SuspendedRequest) -> AsyncIterator[EngineOutput]: ...

    async def release_suspended(self, request_id: str) -> bool: ...

    async def current_load(self) -> LoadReport: ...


@dataclass(frozen=True, slots=True)
class EnginePeer:
    """An in-process ``Engine`` as a migration peer."""

    engine: Engine
    instance_id: str

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        return await self.engine.snapshot(
            request_id, after_tokens=after_tokens, min_new_blocks=min_new_blocks
        )

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        return await self.engine.shadow_pull(snapshot)

    async def suspend(self, request_id: str) -> SuspendedRequest:
        return await self.engine.suspend(request_id)

    def admit_migrated(self, req: SuspendedRequest) -> AsyncIterator[EngineOutput]:
        return self.engine.admit_migrated(req)

    async def release_suspended(self, request_id: str) -> bool:
        return await self.engine.release_suspended(request_id)

    async def current_load(self) -> LoadReport:
        return self.engine.load()


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """Where a request runs after a migration attempt, and how it got there.

    ``stream`` continues the request (its first output already arrived) for ``moved`` and
    ``recomputed``; ``suspended`` holds the authoritative outputs once the source was
    suspended, so a consumer can emit the tokens it has not seen yet before ``stream``'s.
    """

    request_id: str
    status: OutcomeStatus
    source: str
    instance_id: str  # where the request runs (or ended) now
    reason: str = ""  # failure reason label, "" on success
    suspended: SuspendedRequest | None = None
    stream: AsyncIterator[EngineOutput] | None = None
    stages: int = 0
    precopied_tokens: int = 0
    downtime_s: float | None = None  # suspend -> first token on the destination
    total_s: float = 0.0
    blocks_moved: int = 0
    bytes_moved: int = 0  # blocks_moved x the source's KV bytes per block (0 when unknown)


class MigrationCoordinator:
    """Runs migrations; one coordinator serves a whole fleet (it limits per-instance concurrency)."""

    def __init__(
        self,
        config: MigrationConfig | None = None,
        *,
        block_size: int = 32,
        kv_bytes_per_block: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = config or MigrationConfig()
        self._block_size = block_size
        self._bytes_per_block = kv_bytes_per_block
        self._clock = clock
        self._active: Counter[str] = Counter()  # instance id -> migrations it takes part in
        self._cfg_max = self._cfg.max_concurrent_per_instance

    async def migrate(
        self,
        request_id: str,
        src: MigrationPeer,
        dst: MigrationPeer,
        *,
        block_size: int | None = None,
        kv_bytes_per_block: int | None = None,
    ) -> MigrationOutcome:
        """Move ``request_id`` from ``src`` to ``dst``; never raises for a failed move (see outcome).

        ``block_size`` and ``kv_bytes_per_block`` override the coordinator's for instances of
        another geometry.
        """
        t0 = self._clock()
        metrics.MIGRATIONS_STARTED.inc()
        outcome = self._stay(request_id, src, "busy")
        if src.instance_id == dst.instance_id:
            outcome = self._stay(request_id, src, "same_instance")
        elif max(self._active[src.instance_id], self._active[dst.instance_id]) < self._cfg_max:
            self._active.update((src.instance_id, dst.instance_id))
            try:
                outcome = await self._run(request_id, src, dst, block_size or self._block_size)
            finally:
                self._active.subtract((src.instance_id, dst.instance_id))
        bpb = self._bytes_per_block if kv_bytes_per_block is None else kv_bytes_per_block
        outcome = dataclasses.replace(
            outcome, total_s=self._clock() - t0, bytes_moved=outcome.blocks_moved * bpb
        )
        self._record(outcome)
        return outcome

    async def _run(self, rid: str, src: MigrationPeer, dst: MigrationPeer, bs: int) -> MigrationOutcome:
        on_dst = stages = moved = 0
        try:
            # Size probe (no ticket), then the admission check, then the pre-copy stages.
            probe = await self._step(src.snapshot(rid, min_new_blocks=_NO_TICKET))
            if why := await self._admission(dst, probe.num_tokens + bs, bs):  # + the partial block
                return self._stay(rid, src, why)
            for stage in range(self._cfg.max_stages):
                min_new = 1 if stage == 0 else max(1, self._cfg.last_stage_max_blocks)
                snap = await self._step(src.snapshot(rid, after_tokens=on_dst, min_new_blocks=min_new))
                if not snap.kv_transfer_params:
                    break  # few new full blocks: the final stage pulls them with the tail
                await self._step(dst.shadow_pull(snap))
                moved += (snap.num_tokens - on_dst) // bs
                on_dst, stages = snap.num_tokens, stages + 1
        except MigrationError as exc:
            logger.info("migration of %s: pre-copy refused (%s); stays on %s", rid, exc, src.instance_id)
            return self._stay(rid, src, "precopy_refused")
        except Exception as exc:
            logger.warning("migration of %s: pre-copy failed (%r); stays on %s", rid, exc, src.instance_id)
            return self._stay(rid, src, "precopy_failed")
        t_suspend = self._clock()
        try:
            suspended = await self._step(src.suspend(rid))
        except MigrationError as exc:
            logger.info("migration of %s: suspend refused (%s)", rid, exc)
            return self._stay(rid, src, "suspend_refused")
        except Exception as exc:  # dead or wedged source: its stream fails over on its own
            logger.warning("migration of %s: suspend failed (%s)", rid, exc)
            return MigrationOutcome(rid, "lost", src.instance_id, src.instance_id, "suspend_failed")
        base = MigrationOutcome(
            rid,
            "moved",
            src.instance_id,
            dst.instance_id,
            suspended=suspended,
            stages=stages,
            precopied_tokens=on_dst,
        )
        done = len(suspended.output_token_ids) >= suspended.sampling.max_tokens
        if suspended.finish_reason is not None or done:
            return dataclasses.replace(base, status="finished", instance_id=src.instance_id)
        tail = -(-suspended.num_tokens // bs) - on_dst // bs if suspended.kv_transfer_params else 0
        try:
            stream = await self._started(dst.admit_migrated(suspended))
            return dataclasses.replace(
                base, stream=stream, downtime_s=self._clock() - t_suspend, blocks_moved=moved + max(tail, 0)
            )
        except Exception as exc:
            logger.warning("migration of %s: admission on %s failed (%s)", rid, dst.instance_id, exc)
        if suspended.kv_transfer_params:
            await self._release(src, rid)
        plain = dataclasses.replace(suspended, kv_transfer_params={})
        for peer in (dst, src):
            try:
                stream = await self._started(peer.admit_migrated(plain))
            except Exception as exc:
                logger.warning("migration of %s: recompute on %s failed (%s)", rid, peer.instance_id, exc)
                continue
            return dataclasses.replace(
                base,
                status="recomputed",
                instance_id=peer.instance_id,
                reason="admission_failed",
                stream=stream,
                downtime_s=self._clock() - t_suspend,
                blocks_moved=moved,
            )
        return dataclasses.replace(
            base, status="lost", instance_id=src.instance_id, reason="recompute_failed"
        )

    async def _admission(self, dst: MigrationPeer, num_tokens: int, bs: int) -> str | None:
        """Why ``dst`` cannot take a request of ``num_tokens`` now (free blocks + margin), or None."""
        try:
            load = await self._step(dst.current_load())
        except Exception:
            return "destination_unreachable"
        need = -(-(num_tokens + 1) // bs) + self._cfg.admission_margin_blocks
        if load.kv_blocks_total - load.kv_blocks_used < need:
            return "destination_full"
        return None

    async def _step(self, aw: Awaitable[_T]) -> _T:
        async with asyncio.timeout(self._cfg.step_timeout_s):
            return await aw

    async def _started(self, stream: AsyncIterator[EngineOutput]) -> AsyncIterator[EngineOutput]:
        """Wait for ``stream``'s first output; return a stream that replays it, then the rest."""
        try:
            async with asyncio.timeout(self._cfg.step_timeout_s):
                first = await anext(stream)
        except BaseException:
            await aio.aclose(stream)
            raise
        return _prepend(first, stream)

    async def _release(self, src: MigrationPeer, rid: str) -> None:
        try:
            await self._step(src.release_suspended(rid))
        except Exception as exc:  # the lease frees them in the end
            logger.info("migration of %s: releasing the source's blocks failed (%s)", rid, exc)

    def _stay(self, rid: str, src: MigrationPeer, reason: str) -> MigrationOutcome:
        return MigrationOutcome(rid, "stayed", src.instance_id, src.instance_id, reason)

    def _record(self, o: MigrationOutcome) -> None:
        if o.status == "moved":
            metrics.MIGRATIONS_COMPLETED.inc()
        else:
            metrics.MIGRATIONS_FAILED.labels(o.status, o.reason or o.status).inc()
        if o.downtime_s is not None:
            metrics.MIGRATION_DOWNTIME.observe(o.downtime_s)
        metrics.MIGRATION_DURATION.observe(o.total_s)
        if o.blocks_moved:
            metrics.MIGRATION_BLOCKS.inc(o.blocks_moved)
            metrics.MIGRATION_BYTES.inc(o.bytes_moved)
        logger.info(
            "migration of %s %s -> %s: %s%s, %d stages, downtime %s, total %.3f s",
            o.request_id, o.source, o.instance_id, o.status, f" ({o.reason})" if o.reason else "",
            o.stages, "-" if o.downtime_s is None else f"{o.downtime_s * 1000:.1f} ms", o.total_s,
        )  # fmt: skip


async def _prepend(
    first: EngineOutput, rest: AsyncIterator[EngineOutput]
) -> AsyncGenerator[EngineOutput, None]:
    try:
        yield first
        if not first.finished:
            async for out in rest:
                yield out
    finally:
        await aio.aclose(rest)
