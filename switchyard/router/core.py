"""The router core: membership in, one routing decision and one output stream per request out.

Both front doors (the HTTP gateway and ``Router.Generate`` over gRPC) call ``generate``. The
core resolves the model, asks the policy for an instance, dispatches over that instance's
``WorkerClient`` and forwards the output deltas. It owns the things policies must not do:
I/O, metrics, and recovery.

Recovery is failover by recompute: when the instance dies mid-request (``EngineDeadError``),
the request is resubmitted elsewhere by the continuation rule (``EngineRequest.continued``:
its prompt plus the tokens already streamed, ``max_tokens``/``min_tokens`` reduced by as
many), so the client's stream continues with no token lost or repeated. (Greedy decoding
continues exactly; a sampled request continues from the same text with fresh randomness.)
Load arrives by push: one subscription task per instance (``instance_links.py``) feeds the
registry, which also counts what this router dispatched since.

Live migration (``migrate``) moves a streaming request to another instance with its KV cache
(``router/migration.py``); the per-request upstream is a ``MovableStream``, which switches
from the source's stream to the destination's without losing or repeating a token, so the
loop below sees one continuous stream and needs no migration logic of its own.

NOTE FOR DEVELOPERS: ``_stream`` is the per-chunk hot path. Per delta it extends one list,
touches a few locals and forwards the ``MovableStream``'s output unchanged (the stream states
every output in the client's terms, after a failover too). Per request it makes one policy
call (O(instances) at most), two registry updates (O(1)) and one bounded deque append.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from pydantic import SecretStr

from switchyard import metrics
from switchyard.api.auth import InternalCredentials, new_router_id
from switchyard.config import RouterConfig
from switchyard.errors import (
    CapacityError,
    ConflictError,
    EngineDeadError,
    EngineRequestError,
    MigrationError,
    ModelNotFoundError,
)
from switchyard.messages import (
    EngineOutput,
    FinishReason,
    InstanceInfo,
    Membership,
    RoutingRequest,
)
from switchyard.router.dispatch import Dispatcher
from switchyard.router.drain import DrainResult, drain_instance
from switchyard.router.instance_links import InstanceLinks
from switchyard.router.migration import MigrationCoordinator, MigrationOutcome
from switchyard.router.movable_stream import MovableStream
from switchyard.router.policies import RoutingDecision, RoutingOutcome, make_policy, policy_params
from switchyard.router.rebalancer import Rebalancer
from switchyard.router.registry import InstanceRegistry, InstanceState
from switchyard.router.worker_client import WorkerClient

__all__ = ["RouterCore"]

logger = logging.getLogger(__name__)


class _DecisionRecord(NamedTuple):
    """One entry of the debug ring; turned into a dict only when someone asks (a NamedTuple:
    one is built per request, see ``RoutingDecision``)."""

    wall_time: float
    request_id: str
    model: str
    attempt: int
    decision: RoutingDecision
    latency_s: float


class RouterCore:
    """Routes token-level requests over a changing fleet of Worker instances."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        connector: Callable[[InstanceInfo], WorkerClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
        internal_token: SecretStr | None = None,
    ) -> None:
        """``internal_token``: what the default connector's clients send to workers (the token
        their servers require); ignored with a ``connector`` of one's own. The clients also send
        :attr:`router_id`, so workers let only this router abort, suspend or migrate the
        requests it dispatched."""
        self._config = config
        self.router_id = new_router_id()
        """This router's identity towards workers: random per router, never logged or published."""
        credentials = InternalCredentials(token=internal_token, router_id=self.router_id)
        self._clock = clock
        self._registry = InstanceRegistry(clock=clock)
        params = policy_params(config.policy, config.policy_params, ttft_slo_ms=config.ttft_slo_ms)
        self._policy = make_policy(config.policy, params, clock=clock)
        self._policy_name = config.policy
        self._dispatcher = Dispatcher(self._policy, config.policy)
        self._links = InstanceLinks(
            self._registry,
            connector=connector or functools.partial(WorkerClient.for_instance, credentials=credentials),
            load_report_interval_s=config.load_report_interval_s,
        )
        self._changed = asyncio.Event()  # set and replaced on every membership change
        self._decisions: deque[_DecisionRecord] = deque(maxlen=config.decision_log_size)
        self._model_metrics: dict[str, metrics.ModelRequestMetrics] = {}
        self._decision_latency = metrics.ROUTER_DECISION_LATENCY.labels(config.policy)
        self._decision_counts = {
            o: metrics.ROUTING_DECISIONS.labels(config.policy, o.value) for o in RoutingOutcome
        }
        # Policies that estimate TTFT hear measured ones (``Dispatch.first_token``); their
        # estimate error becomes a metric.
        self._ttft_error = metrics.ROUTER_TTFT_ESTIMATE_ERROR.labels(config.policy)
        self._migrator = MigrationCoordinator(config.migration, clock=clock)
        self._streams: dict[str, MovableStream] = {}  # request id -> its upstream, for migrate()
        self._request_ids: set[str] = set()  # ids streaming through this router (one request each)
        self._rebalancer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin following the load of every member (also those applied before start)."""
        self._links.follow_load()
        if self._config.rebalancer.enabled and self._rebalancer is None:
            self._rebalancer = self._links.spawn(
                Rebalancer(self, self._config.rebalancer, clock=self._clock).run()
            )

    async def close(self) -> None:
        """Drop every instance (their in-flight requests fail) and stop background work."""
        if self._closed:
            return
        self.apply_membership(Membership(version=self._registry.membership.version + 1))
        self._closed = True
        self._changed.set()
        if self._rebalancer is not None:
            self._rebalancer.cancel()
        await self._links.close()

    @property
    def ready(self) -> bool:
        """Some instance can take new work: live, reporting its load, and not draining."""
        return self._registry.ready

    @property
    def unready_reason(self) -> str | None:
        """Why no instance can take new work now (all drained, none live), or None when one can."""
        return self._registry.unready_reason()

    @property
    def registry(self) -> InstanceRegistry:
        """The instance registry (read-only use: debug views and tests)."""
        return self._registry

    # -- membership ---------------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        return self._registry.membership

    def apply_membership(self, m: Membership) -> None:
        """Adopt a newer membership: connect new instances, drop departed ones and their load.

        Call it from the event loop. Requests still streaming from a departed instance fail
        over. A membership that is not newer than the current one is ignored.
        """
        diff = self._registry.apply(m)
        if diff is None:
            current = self._registry.membership
            if m.version != current.version or m.instances != current.instances:
                logger.warning("ignoring membership v%s: not newer than v%s", m.version, current.version)
            return
        for info in diff.removed:
            self._links.remove(info.instance_id)
        for info in diff.added:
            self._links.add(info)
        self._policy.on_membership(sorted(m.instances, key=lambda i: i.instance_id))
        metrics.INSTANCES.clear()
        for model, n in Counter(i.model for i in m.instances).items():
            metrics.INSTANCES.labels(model).set(n)
        n_added, n_removed = len(diff.added), len(diff.removed)
        logger.info("membership v%s: %d instances (+%d -%d)", m.version, len(m.instances), n_added, n_removed)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_membership_change(self, since_version: int) -> Membership:
        """The membership once its version exceeds ``since_version`` (at once if it already does)."""
        while self._registry.membership.version <= since_version:
            if self._closed:
                raise CapacityError("the router is shutting down")
            await self._changed.wait()
        return self._registry.membership

    def served_models(self) -> dict[str, InstanceInfo]:
        """Served model name -> one of its instances (for ``/v1/models`` and context limits)."""
        return self._registry.models()

    # -- requests -----------------------------------------------------------------------------

    def generate(self, req: RoutingRequest) -> AsyncGenerator[EngineOutput, None]:
        """Route ``req`` and stream its output deltas, each stamped with its instance id.

        Raises at once ``ModelNotFoundError`` (unknown model; ``""`` means the only served one),
        ``CapacityError`` (no live instance) and ``ConflictError`` (``req.request_id`` is already
        streaming through this router: its abort, migration and metrics would be mixed up with
        the other's). While streaming: ``EngineDeadError`` once failover attempts are used up,
        ``CapacityError`` when no instance is left to fail over to, and the instance's own
        errors. Closing or cancelling the iterator aborts the request on its instance.

        The id is held from the stream's first step to its end, not from this call: a stream
        that is never iterated never runs its ``finally`` and would hold it forever. So two
        calls with one id before either stream started both return, and the second stream
        raises ``ConflictError`` on its first step instead.
        """
        if req.request_id in self._request_ids:
            raise self._conflict(req.request_id)
        model = self._resolve_model(req.model)
        if not self._registry.fleet(model).instances:
            raise CapacityError(f"no live instance serves model {model!r} right now")
        return self._stream(req, model)

    @staticmethod
    def _conflict(request_id: str) -> ConflictError:
        return ConflictError(
            f"request id {request_id!r} is already streaming through this router; use a unique id",
            param="request_id",
        )

    def _resolve_model(self, name: str) -> str:
        if self._registry.serves(name):
            return name
        served = sorted(self._registry.models())
        if not served:
            raise CapacityError("no instances are registered yet")
        if not name and len(served) == 1:
            return served[0]
        raise ModelNotFoundError(
            f"model {name!r} is not served here; served models: {', '.join(served)}", param="model"
        )

    def _choose(self, req: RoutingRequest, model: str, attempt: int) -> tuple[InstanceState, RoutingDecision]:
        fleet = self._registry.fleet(model)
        if not fleet.instances:
            raise CapacityError(f"no live instance serves model {model!r} right now")
        t0 = time.perf_counter()
        state, decision = self._dispatcher.choose(req, fleet)
        latency = time.perf_counter() - t0
        self._decision_latency.observe(latency)
        self._decision_counts[decision.outcome].inc()
        self._decisions.append(
            _DecisionRecord(time.time(), req.request_id, model, attempt, decision, latency)
        )
        return state, decision

    async def _stream(self, req: RoutingRequest, model: str) -> AsyncGenerator[EngineOutput, None]:
        mm = self._model_metrics.get(model) or self._model_metrics.setdefault(
            model, metrics.ModelRequestMetrics(model, self._policy_name)
        )
        clock = self._clock
        t_start = clock()
        t_first = t_last = 0.0
        generated: list[int] = []  # every token the client has received; the failover prompt
        num_prompt = num_cached = -1  # as the client first saw them
        outcome = "error"
        attempt = 0
        first_leg = req.engine_request()
        rid = req.request_id
        if rid in self._request_ids:
            raise self._conflict(rid)
        self._request_ids.add(rid)
        try:
            while True:
                engine_req = first_leg.continued(generated)
                if engine_req is None:  # the instance died after the last token, before "finished"
                    outcome = "finished"
                    yield EngineOutput(
                        req.request_id, (), True, FinishReason.LENGTH, num_prompt, num_cached, ""
                    )
                    return
                state, decision = self._choose(req, model, attempt)
                iid = decision.instance_id
                dispatch = self._dispatcher.dispatched(req, state, decision, len(engine_req.prompt_token_ids))
                t_dispatch = clock()
                usage = (num_prompt, num_cached) if num_prompt >= 0 else None  # as the client saw it
                stream = MovableStream(
                    req.request_id, iid, self._links[iid].generate(engine_req), usage=usage
                )
                self._streams[req.request_id] = stream
                prefilled = False
                try:
                    anext_ = stream.__anext__
                    while True:
                        if prefilled:
                            out = await anext_()
                        else:
                            async with asyncio.timeout(self._config.first_token_timeout_s):
                                out = await anext_()
                        if not prefilled:
                            prefilled = True
                            error = dispatch.first_token(clock() - t_dispatch, stream.engine_cached_tokens)
                            if error is not None:
                                self._ttft_error.observe(error)
                        if num_prompt < 0:
                            num_prompt, num_cached = out.num_prompt_tokens, out.num_cached_tokens
                        if out.token_ids:
                            t_last = clock()
                            if not generated:
                                t_first = t_last
                                mm.ttft.observe(t_first - t_start)
                            generated.extend(out.token_ids)
                        if out.finished:
                            outcome = "aborted" if out.finish_reason is FinishReason.ABORT else "finished"
                            if len(generated) > 1:
                                mm.tpot.observe((t_last - t_first) / (len(generated) - 1))
                        yield out
                        if out.finished:
                            return
                except StopAsyncIteration:
                    exc: EngineDeadError | None = EngineDeadError(f"instance {iid} ended the stream early")
                except TimeoutError as err:
                    raise EngineRequestError(
                        f"instance {iid} produced nothing for {self._config.first_token_timeout_s:g} s"
                    ) from err
                except EngineDeadError as err:
                    exc = err
                finally:
                    # Accounting stays with the dispatch instance even after a migration moved
                    # the request; load reports correct the registry's counts soon after.
                    dispatch.finished()
                    if self._streams.get(req.request_id) is stream:
                        del self._streams[req.request_id]
                    await stream.aclose()  # still running: an abort goes to the worker
                # Only EngineDeadError (or an early end) gets here: fail over or give up.
                iid = stream.instance_id  # the instance that died (a migration may have moved it)
                self._registry.mark_down(iid)
                if attempt >= self._config.max_failover_attempts:
                    assert exc is not None
                    raise exc
                attempt += 1
                mm.failovers.inc()
                logger.warning(
                    "request %s: instance %s died after %d tokens (%s); failover %d/%d",
                    req.request_id, iid, len(generated), exc, attempt, self._config.max_failover_attempts,
                )  # fmt: skip
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self._request_ids.discard(rid)
            mm.e2e.observe(clock() - t_start)
            mm.requests[outcome].inc()

    async def migrate(self, request_id: str, dst_instance_id: str) -> MigrationOutcome:
        """Live-migrate a streaming request to ``dst_instance_id``; its client stream continues.

        Raises ``MigrationError`` when the request is not streaming through this router or the
        destination is unknown. A move that fails on the way never fails the request: the
        outcome says where it runs (``stayed`` on the source, ``recomputed``, ...).
        """
        stream = self._streams.get(request_id)
        if stream is None:
            raise MigrationError(f"request {request_id!r} is not streaming through this router")
        src, dst = self._links.get(stream.instance_id), self._links.get(dst_instance_id)
        if src is None or dst is None:
            raise MigrationError(
                f"cannot move {request_id!r} from {stream.instance_id!r} to {dst_instance_id!r}"
            )
        infos = {i.instance_id: i for i in self._registry.membership.instances}
        dst_info, src_info = infos.get(dst_instance_id), infos.get(stream.instance_id)
        return await stream.move(
            self._migrator,
            src,
            dst,
            block_size=dst_info.block_size if dst_info else None,
            kv_bytes_per_block=src_info.kv_bytes_per_block if src_info else None,
        )

    @property
    def streams(self) -> Mapping[str, MovableStream]:
        """Request id -> its upstream (read-only; ``instance_id`` says where it runs now)."""
        return MappingProxyType(self._streams)

    async def drain(self, instance_id: str, *, timeout_s: float = 60.0) -> DrainResult:
        """Stop routing to ``instance_id`` and migrate its requests off (``router/drain.py``).
        Raises ``KeyError`` for an unknown instance."""
        return await drain_instance(self, instance_id, timeout_s=timeout_s)

    def undrain(self, instance_id: str) -> bool:
        """Route to a drained instance again; False if it is unknown."""
        return self._registry.set_draining(instance_id, False)

    # -- debug view ---------------------------------------------------------------------------

    def recent_decisions(self) -> list[dict[str, Any]]:
        """The last ``decision_log_size`` routing decisions, oldest first, JSON-ready."""
        return [
            {
                "time": r.wall_time,
                "request_id": r.request_id,
                "model": r.model,
                "policy": self._policy_name,
                "attempt": r.attempt,
                "decision_latency_s": r.latency_s,
                **r.decision.as_dict(),
            }
            for r in self._decisions
        ]
