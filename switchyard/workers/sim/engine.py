"""The simulated engine (a performance model, never inference) in real time.

``SimInstance`` says what one vLLM V1 instance would do in each step and how long the step
takes; ``SimEngine`` implements the ``Engine`` protocol over it in **real time**: an asyncio
task runs the step loop and sleeps each step's modeled duration, so the instance actor, the
worker gRPC service, the router and the gateway can be run against it exactly as against
``VLLMEngine``. Steps are kept on a modeled timeline (a late wake-up is made up by the next
sleep, up to ``max_lag_s``) so event-loop jitter does not accumulate into simulated slowness.

Migration works as on vLLM when the engine has a ``KvTransferCost`` (``from_config`` takes the
profile's): the coordinator's steps act on the instance (``snapshot`` reads its full blocks,
``shadow_pull`` lands them in the destination's prefix cache, ``suspend`` ends the stream with
ABORT, ``admit_migrated`` continues the same token sequence with the KV in place) and each
pull sleeps its modeled transfer time. The ticket is a small JSON dict (the source's KV
extent); the source frees its blocks at the suspend, so ``release_suspended`` has nothing to
free. Without a ``KvTransferCost`` every migration step refuses and requests stay put.

The virtual-time driver of many instances, for benchmarks, is ``fleet.SimFleet``
(re-exported here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Sequence
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
from switchyard.workers.sim.cost import KvTransferCost, load_profile
from switchyard.workers.sim.fleet import OutputCallback, SimFleet, VirtualClock
from switchyard.workers.sim.instance import SimInstance
from switchyard.workers.sim.request import SimSuspended

__all__ = ["OutputCallback", "SimEngine", "SimFleet", "VirtualClock"]

logger = logging.getLogger(__name__)


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

    def __init__(
        self, instance: SimInstance, *, max_lag_s: float = 0.05, kv_transfer: KvTransferCost | None = None
    ) -> None:
        self._instance = instance
        self._max_lag_s = max_lag_s
        self._kv_transfer = kv_transfer
        self._streams: dict[str, _OutputStream] = {}
        self._requests: dict[str, EngineRequest] = {}  # the client's request behind each stream
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: EngineDeadError | None = None

    @classmethod
    def from_config(cls, cfg: EngineConfig, *, instance_id: str = "sim-0") -> SimEngine:
        """Build a real-time engine; ``sim.time_mode="virtual"`` belongs to ``SimFleet`` instead."""
        if cfg.sim.time_mode != "real":
            raise ConfigError("SimEngine runs in real time; drive virtual-time instances with SimFleet")
        cost = KvTransferCost.from_profile(load_profile(cfg.sim.profile), block_size=cfg.block_size)
        return cls(SimInstance.from_config(cfg, instance_id=instance_id), kv_transfer=cost)

    @property
    def instance(self) -> SimInstance:
        return self._instance

    @property
    def block_size(self) -> int:
        return self._instance.block_size

    @property
    def kv_bytes_per_block(self) -> int:
        """What one block weighs on the wire, from the profile's model shape; 0 without a transfer model."""
        return self._kv_transfer.bytes_per_block if self._kv_transfer is not None else 0

    @property
    def max_model_len(self) -> int:
        return self._instance.max_model_len

    def generate(self, req: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream ``req``'s deltas; cancelling or closing the iterator aborts the request."""
        return self._serve(req, None)

    async def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with an empty ``FinishReason.ABORT`` delta."""
        return self._abort(request_id, stream=self._streams.get(request_id))

    def load(self) -> LoadReport:
        return self._instance.load(time.monotonic())

    # -- migration (see the module docstring) ------------------------------------------------

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        """The request's full KV blocks; a ticket only if ``min_new_blocks`` accrued past ``after_tokens``."""
        self._require_transfer()
        view = self._instance.migration_view(request_id) if request_id in self._streams else None
        if view is None:
            raise MigrationError(f"request {request_id!r} is not running on {self._instance.instance_id}")
        bs = self.block_size
        full = view[0] // bs
        ticket = self._ticket(full * bs) if full - after_tokens // bs >= min_new_blocks else {}
        return KvSnapshot(request_id, self._instance.instance_id, tuple(view[1][: full * bs]), ticket)

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        """Pull the snapshot's blocks this prefix cache lacks (sleeping the transfer); tokens held."""
        cost = self._require_transfer()
        n = snapshot.num_tokens // self.block_size
        missing = n - self._instance.cached_prefix_blocks(snapshot.token_ids, n)
        if missing and not snapshot.kv_transfer_params:
            raise MigrationError("a snapshot without a ticket has nothing to pull")
        await asyncio.sleep(cost.transfer_s(missing))
        self._check_alive()
        if self._instance.precopy(snapshot.token_ids, n) is None:
            raise MigrationError(f"{self._instance.instance_id} cannot hold pre-copied blocks now")
        return n * self.block_size

    async def suspend(self, request_id: str) -> SuspendedRequest:
        """Take the request out (its stream ends with ABORT) and return every output it produced."""
        self._require_transfer()
        req, stream = self._requests.get(request_id), self._streams.get(request_id)
        if req is None or stream is None or request_id not in self._instance:
            raise MigrationError(f"request {request_id!r} is not running on {self._instance.instance_id}")
        if (why := req.sampling.migration_refusal()) is not None:
            raise MigrationError(f"request {request_id!r} cannot migrate: {why}")
        state = self._instance.suspend(request_id)
        assert state is not None
        self._end_stream(request_id, stream)
        ticket = self._ticket(state.num_computed) if state.num_computed else {}
        return SuspendedRequest(
            request_id, self._instance.instance_id, req.prompt_token_ids, state.outputs, req.sampling, ticket
        )

    def admit_migrated(self, req: SuspendedRequest) -> AsyncGenerator[EngineOutput, None]:
        """Continue a suspended request here: pull the KV it lacks, then stream the next tokens."""
        return self._serve(req.request, req)

    async def release_suspended(self, request_id: str) -> bool:
        """Nothing to release: the source frees a suspended request's blocks at once."""
        self._require_transfer()
        return False

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` once the engine is closed."""
        self._check_alive()

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
            self._end_stream(request_id, stream)
        return True

    def _end_stream(self, request_id: str, stream: _OutputStream) -> None:
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

    async def _serve(
        self, req: EngineRequest, moved: SuspendedRequest | None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Run ``req`` (a new request, or ``moved`` continuing here) and stream its deltas."""
        self._check_alive()
        rid = req.request_id
        if moved is None:
            self._instance.add_request(req)  # our own errors (context length, duplicates) pass through
        else:
            await self._admit(req, moved.output_token_ids, moved.kv_transfer_params.get("num_computed", 0))
        stream = _OutputStream()
        self._streams[rid], self._requests[rid] = stream, req
        self._ensure_step_loop()
        try:
            while True:
                out = stream.get_nowait() or await stream.get()
                yield out
                if out.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self._abort(rid, stream=None)
            raise
        except SwitchyardError:
            raise
        except Exception as exc:  # a bug in the model: fail this request, keep the engine
            self._abort(rid, stream=None)
            raise EngineRequestError(f"simulated request {rid!r} failed: {exc}") from exc
        finally:
            if self._streams.get(rid) is stream:
                del self._streams[rid], self._requests[rid]

    async def _admit(self, req: EngineRequest, outputs: Sequence[int], num_computed: int) -> None:
        """Queue a moved request after pulling the blocks of its ``num_computed`` tokens it lacks."""
        cost = self._require_transfer()
        if len(outputs) >= req.sampling.max_tokens:
            raise MigrationError(f"request {req.request_id!r} has nothing left to generate")
        state = SimSuspended.of(req, outputs, int(num_computed))
        bs, computed = self.block_size, state.num_computed
        await asyncio.sleep(
            cost.transfer_s(
                -(-computed // bs) - self._instance.cached_prefix_blocks(state.tokens, computed // bs)
            )
        )
        self._check_alive()
        if self._instance.admit_migrated(state) is None:  # no room for the KV: recompute instead
            self._instance.admit_migrated(dataclasses.replace(state, num_computed=0))

    def _ticket(self, num_computed: int) -> dict[str, object]:
        return {"sim_source": self._instance.instance_id, "num_computed": num_computed}

    def _require_transfer(self) -> KvTransferCost:
        self._check_alive()
        if self._kv_transfer is None:
            raise MigrationError("this simulated engine has no KV transfer model; migration is off")
        return self._kv_transfer

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead

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
